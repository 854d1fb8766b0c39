"""End to end: traffic through the mesh -> Kafka -> logger -> ClickHouse -> analysis -> the rollout
controller rolls back a degraded canary on the analysis verdict alone (router-counter triggers off),
promotes early on a significant win in user feedback, and runs a Thompson-sampling bandit on it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api import gateway_pb2, gateway_pb2_grpc
from services.common.kafka import KafkaSettings, ensure_topics
from services.common.net import free_port
from services.common.settings import REPO_ROOT
from services.common.tansu import TansuBroker
from services.common.triton_server import TritonServer
from services.gateway.keys import KeyStore
from services.registry.app import RegistryApp, start_registry
from services.registry.settings import RegistrySettings, RolloutDefaults
from tests.integration._mesh import MeshProcess
from tests.integration.mesh_fixtures import GENEROUS_LIMITS
from tests.integration.test_registry_rollouts import Traffic, tabular_files

MODEL = "rollout-clf"  # the traffic helper's model name
# Effectively off, so only the analysis verdict can stop the canary.
TRIGGERS_OFF = {"max_error_rate": 1.0, "max_latency_ratio": 1e9}


async def _wait_serving(address: str, timeout_s: float = 60.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(int(timeout_s / 0.2)):
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} not serving after {timeout_s}s")


def _start(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The logger and the analysis service in one process: they share the embedded ClickHouse."""
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.mesh"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)


@pytest.fixture(scope="module")
async def stack(
    triton: TritonServer, kafka_broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RegistryApp, MeshProcess, str]]:
    workdir = tmp_path_factory.mktemp("analysis-e2e")
    suffix = uuid.uuid4().hex[:8]
    topics = {"PREDICTIONS_TOPIC": f"gate.predictions.{suffix}", "FEEDBACK_TOPIC": f"gate.feedback.{suffix}",
              "ALERTS_TOPIC": f"gate.alerts.{suffix}", "DEADLETTER_TOPIC": f"gate.deadletter.{suffix}"}
    await asyncio.to_thread(
        ensure_topics, KafkaSettings(bootstrap_servers=kafka_broker.bootstrap, **{k.lower(): v for k, v in topics.items()})
    )
    drift_port = free_port()
    analytics_env = {
        **os.environ,
        "MLMESH_SERVICES": "logger,drift",
        "MLMESH_LOGGER_PORT": str(free_port()),
        "MLMESH_DRIFT_PORT": str(drift_port),
        "MLMESH_LOGGER_CLICKHOUSE_DSN": f"chdb://{workdir / 'clickhouse'}",
        "MLMESH_LOGGER_GROUP_ID": f"gate-logger-{suffix}",
        "MLMESH_LOGGER_PII_HASH_SALT": "test-salt",
        "MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        **{f"MLMESH_LOGGER_KAFKA__{k}": v for k, v in topics.items()},
    }
    log_path = workdir / "analytics.log"
    analytics = await asyncio.to_thread(_start, analytics_env, log_path)
    registry = await start_registry(RegistrySettings(
        port=0, database_url=f"sqlite:///{workdir / 'registry.db'}", artifact_dir=str(workdir / "artifacts"),
        triton_url=triton.grpc_url, grace_period_s=2.0, analysis_address=f"127.0.0.1:{drift_port}",
        rollout=RolloutDefaults(step_duration_s=4.0, min_requests_per_step=50, analysis_interval_s=0.5),
    ))
    keys_db = workdir / "keys.db"
    api_key = KeyStore(keys_db).create("gate", GENEROUS_LIMITS).api_key
    mesh = MeshProcess(
        "gateway,router", triton.grpc_url, keys_db, workdir / "mesh.log",
        MLMESH_ROUTER_REGISTRY_ADDRESS=registry.address,
        MLMESH_ROUTER_METRICS_REPORT_INTERVAL_S="0.2",
        MLMESH_ROUTER_TABLE_CACHE_PATH=str(workdir / "router-table.json"),
        MLMESH_GATEWAY_EVENTS__ENABLED="true",
        MLMESH_GATEWAY_EVENTS__SPOOL_DIR=str(workdir / "spool"),
        MLMESH_GATEWAY_EVENTS__KAFKA__BOOTSTRAP_SERVERS=kafka_broker.bootstrap,
        **{f"MLMESH_GATEWAY_EVENTS__KAFKA__{k}": v for k, v in topics.items()},
    )
    try:
        await _wait_serving(f"127.0.0.1:{drift_port}")
        stable = await registry.registry.register("test", MODEL, "tabular", tabular_files(), "stable")
        await registry.registry.transition("test", MODEL, str(stable.version), "staging", "")
        await registry.registry.transition("test", MODEL, str(stable.version), "production", "")
        mesh.start()
        await asyncio.to_thread(mesh.wait_serving, api_key, 60.0, (MODEL,))
        yield registry, mesh, api_key
    finally:
        exit_code = await asyncio.to_thread(mesh.stop)
        await registry.stop()
        analytics.send_signal(signal.SIGTERM)
        analytics_exit = await asyncio.to_thread(analytics.wait, 30)
        assert exit_code == 0, mesh.log_tail()
        assert analytics_exit == 0, (await asyncio.to_thread(log_path.read_text))[-3000:]


async def test_degraded_canary_is_rolled_back_on_the_clickhouse_verdict(stack) -> None:
    registry, mesh, api_key = stack
    slow = await registry.registry.register("test", MODEL, "", tabular_files(fault_delay_ms="25"), "degraded")
    await registry.registry.transition("test", MODEL, str(slow.version), "staging", "")
    async with Traffic(mesh.gateway, api_key, concurrency=8).running():
        state = await registry.rollouts.start("test", MODEL, str(slow.version), steps=[0.5, 1.0],
                                              triggers=TRIGGERS_OFF)
        for _ in range(240):
            if registry.rollouts.get(state.id).state not in ("running", "paused"):
                break
            await asyncio.sleep(0.25)
    state = registry.rollouts.get(state.id)
    assert state.state == "rolled_back", (state.state, state.reason, state.analyses)
    assert "worse on the canary" in state.reason and "latency" in state.reason, state.reason
    assert "always-valid p=" in state.reason
    production = await registry.registry.production(MODEL)
    assert production is not None and production.version != slow.version


@dataclass
class UsersWithFeedback(Traffic):
    """Users who report whether each answer helped (label "1" or "0"). The chance depends on the
    variant that answered: the candidate helps more often, as a better model would."""

    helped: dict[str, float] = field(default_factory=dict)
    feedback: Counter = field(default_factory=Counter)

    async def react(
        self, stub: gateway_pb2_grpc.GatewayStub, reply: gateway_pb2.PredictResponse, metadata: list[tuple[str, str]],
        rng: random.Random,
    ) -> None:
        variant = reply.served_by.variant or "stable"
        label = "1" if rng.random() < self.helped[variant] else "0"
        await stub.Feedback(
            gateway_pb2.FeedbackRequest(prediction_id=reply.prediction_id, label=label), metadata=metadata, timeout=10
        )
        self.feedback[(variant, label)] += 1


async def _until_ended(registry: RegistryApp, rollout_id: str, timeout_s: float = 90.0) -> None:
    for _ in range(int(timeout_s / 0.25)):
        if registry.rollouts.get(rollout_id).state not in ("running", "paused"):
            return
        await asyncio.sleep(0.25)


async def test_a_significant_win_on_the_primary_metric_promotes_early(stack) -> None:
    registry, mesh, api_key = stack
    better = await registry.registry.register("test", MODEL, "", tabular_files(), "helps more users")
    await registry.registry.transition("test", MODEL, str(better.version), "staging", "")
    async with UsersWithFeedback(mesh.gateway, api_key, 6, helped={"canary": 0.8, "stable": 0.3}).running() as users:
        state = await registry.rollouts.start(
            "test", MODEL, str(better.version), steps=[0.3, 0.6, 0.9, 1.0], triggers=TRIGGERS_OFF,
            primary_metric={"kind": "label_rate", "value": "1"},
        )
        await _until_ended(registry, state.id)
    state = registry.rollouts.get(state.id)
    assert users.failures == []
    assert state.state == "promoted", (state.state, state.reason, state.analyses)
    verdicts = [a["verdict"] for a in state.analyses]
    assert verdicts[-1] == "promote" and len(verdicts) < 4, verdicts  # steps were skipped
    assert state.reason.startswith("label_rate[1] better on the canary") and "always-valid p=" in state.reason
    production = await registry.registry.production(MODEL)
    assert production is not None and production.version == better.version


async def test_bandit_shifts_traffic_to_the_better_arm_and_promotes_it(stack) -> None:
    registry, mesh, api_key = stack
    better = await registry.registry.register("test", MODEL, "", tabular_files(), "bandit arm")
    await registry.registry.transition("test", MODEL, str(better.version), "staging", "")
    async with UsersWithFeedback(mesh.gateway, api_key, 6, helped={"canary": 0.6, "stable": 0.4}).running() as users:
        state = await registry.rollouts.start(
            "test", MODEL, str(better.version), triggers=TRIGGERS_OFF, allocation="bandit", min_requests=300,
            primary_metric={"kind": "label_rate", "value": "1"}, max_rounds=8, decision_probability=0.99,
        )
        await _until_ended(registry, state.id, 150.0)
    state = registry.rollouts.get(state.id)
    assert users.failures == []
    assert state.state == "promoted", (state.state, state.reason, state.analyses)
    assert state.reason.startswith("bandit: P(canary better on label_rate[1]) = "), state.reason
    rounds = state.analyses
    assert rounds[0]["fraction"] == 0.5  # the uniform prior splits evenly
    for previous, current in itertools.pairwise(rounds):
        # Each round runs at the share the previous round's posterior gave the canary (the same
        # share again while no feedback has been logged yet).
        p = previous["prob_canary_best"]
        expected = previous["fraction"] if p is None else min(max(p, 0.05), 0.95)
        assert current["fraction"] == pytest.approx(expected), rounds
    assert rounds[-1]["prob_canary_best"] >= 0.99
    production = await registry.registry.production(MODEL)
    assert production is not None and production.version == better.version
