"""Registry end to end: a real Triton, the registry, and a gateway+router process watching it.

Traffic goes through the public gateway API only; versions move through the registry's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from services.common import errors
from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.settings import REPO_ROOT
from services.common.triton_server import TritonServer
from services.gateway.keys import KeyStore
from services.registry.app import RegistryApp, start_registry
from services.registry.artifacts import read_directory
from services.registry.bootstrap import with_parameters
from services.registry.deployer import DeploymentError, triton_name
from services.registry.settings import RegistrySettings, RolloutDefaults
from tests.integration._mesh import MeshProcess
from tests.integration.mesh_fixtures import GENEROUS_LIMITS

TABULAR_DIR = REPO_ROOT / "model_repository" / "tabular_classifier"
MODEL = "rollout-clf"


def tabular_files(**parameters: str) -> dict[str, bytes]:
    """The demo classifier's model directory, optionally with fault parameters in its config."""
    return with_parameters(read_directory(TABULAR_DIR), parameters)


@dataclass
class Traffic:
    """Concurrent Predict calls through the gateway until stopped, counting what came back."""

    address: str
    api_key: str
    concurrency: int = 4
    served: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def react(
        self, stub: gateway_pb2_grpc.GatewayStub, reply: gateway_pb2.PredictResponse, metadata: list[tuple[str, str]],
        rng: random.Random,
    ) -> None:
        """What a user does with an answer; subclasses send feedback."""

    async def _client(self, stub: gateway_pb2_grpc.GatewayStub, rng: random.Random) -> None:
        features = np.zeros((1, 30), dtype="<f4")
        request = gateway_pb2.PredictRequest(
            model=MODEL,
            inputs=[common_pb2.Tensor(name="features", dtype="FP32", shape=[1, 30], raw_data=features.tobytes())],
        )
        metadata = [("authorization", f"Bearer {self.api_key}")]
        while not self._stop.is_set():
            request.unit_id = f"user-{rng.randrange(1_000_000)}"
            try:
                response = await stub.Predict(request, metadata=metadata, timeout=10)
                self.served[response.served_by.model_version] += 1
                self.variants[response.served_by.variant] += 1
                await self.react(stub, response, metadata, rng)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Traffic]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            tasks = [asyncio.create_task(self._client(stub, random.Random(i))) for i in range(self.concurrency)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
async def registry_app(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryApp]:
    workdir = tmp_path_factory.mktemp("registry")
    settings = RegistrySettings(
        port=0,
        database_url=f"sqlite:///{workdir / 'registry.db'}",
        artifact_dir=str(workdir / "artifacts"),
        triton_url=triton.grpc_url,
        grace_period_s=2.0,
        rollout=RolloutDefaults(step_duration_s=2.0, min_requests_per_step=30, analysis_interval_s=0.25),
    )
    app = await start_registry(settings)
    v1 = await app.registry.register("test", MODEL, "tabular", tabular_files(), "baseline")
    await app.registry.transition("test", MODEL, str(v1.version), "staging", "test setup")
    await app.registry.transition("test", MODEL, str(v1.version), "production", "test setup")
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def mesh(
    registry_app: RegistryApp, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[MeshProcess, str]]:
    """The mesh in its own process; waits run in threads so the registry (on this loop) answers."""
    workdir = tmp_path_factory.mktemp("registry-mesh")
    keys_db = workdir / "keys.db"
    api_key = KeyStore(keys_db).create("rollouts", GENEROUS_LIMITS).api_key
    process = MeshProcess(
        "gateway,router", triton.grpc_url, keys_db, workdir / "mesh.log",
        MLMESH_ROUTER_REGISTRY_ADDRESS=registry_app.address,
        MLMESH_ROUTER_METRICS_REPORT_INTERVAL_S="0.2",
        MLMESH_ROUTER_TABLE_CACHE_PATH=str(workdir / "router-table.json"),
    )
    process.start()
    try:
        await asyncio.to_thread(process.wait_serving, api_key, 60.0, (MODEL,))
        yield process, api_key
    finally:
        exit_code = await asyncio.to_thread(process.stop)
    assert exit_code == 0, f"mesh did not shut down cleanly:\n{process.log_tail()}"


async def _production(app: RegistryApp) -> int:
    record = await app.registry.production(MODEL)
    assert record is not None
    return record.version


async def _wait_rollout_end(app: RegistryApp, rollout_id: str, timeout_s: float = 90.0) -> str:
    for _ in range(int(timeout_s / 0.25)):
        state = app.rollouts.get(rollout_id)
        if state.state in ("promoted", "rolled_back", "aborted", "failed"):
            return state.state
        await asyncio.sleep(0.25)
    raise AssertionError(f"rollout {rollout_id} still {app.rollouts.get(rollout_id).state} after {timeout_s}s")


async def test_swap_under_load_has_zero_failed_requests(registry_app: RegistryApp, mesh: tuple[MeshProcess, str]):
    process, api_key = mesh
    before = await _production(registry_app)
    new = await registry_app.registry.register("test", MODEL, "", tabular_files(), "retrained")
    await registry_app.registry.transition("test", MODEL, str(new.version), "staging", "review passed")
    async with Traffic(process.gateway, api_key).running() as traffic:
        await asyncio.sleep(1.0)
        phases: list[str] = []
        await registry_app.registry.transition(
            "test", MODEL, str(new.version), "production", "swap under load", lambda phase, _m: phases.append(phase)
        )
        await asyncio.sleep(1.0)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.served[str(before)] > 0 and traffic.served[str(new.version)] > 0, traffic.served
    assert phases[-1] == "done" and "draining" in phases and "unloading" in phases, phases
    old = await registry_app.registry.resolve(MODEL, str(before))
    assert old.stage == "archived"
    assert not await registry_app.registry.deployer.is_ready(old.triton_model)


async def test_a_stale_model_under_the_versions_triton_name_is_replaced(registry_app: RegistryApp, mesh):
    """Another registry on this Triton (or a wiped database) left a different, broken model under
    the name the next version will get: the registry loads its own artifact instead of trusting it."""
    process, api_key = mesh
    next_version = max(r.version for r in await registry_app.registry.list_versions(MODEL)) + 1
    name = triton_name(MODEL, next_version)
    deployer = registry_app.registry.deployer
    await deployer.load(name, tabular_files(fault_error_rate="1.0"), "another-registrys-artifact")
    record = await registry_app.registry.register("test", MODEL, "", tabular_files(), "healthy retrain")
    assert record.version == next_version
    await registry_app.registry.transition("test", MODEL, str(record.version), "staging", "")
    async with Traffic(process.gateway, api_key, concurrency=2).running() as traffic:
        await registry_app.registry.transition("test", MODEL, str(record.version), "production", "swap")
        await asyncio.sleep(0.5)
    assert traffic.failures == [] and traffic.served[str(record.version)] > 0, traffic.served
    assert await deployer.loaded_artifact(name) == record.artifact_sha256


async def test_version_that_fails_to_load_leaves_production_serving(registry_app: RegistryApp, mesh):
    process, api_key = mesh
    serving = await _production(registry_app)
    files = tabular_files()
    files["1/model.py"] = b"raise RuntimeError('this model cannot start')\n"
    broken = await registry_app.registry.register("test", MODEL, "", files, "broken build")
    await registry_app.registry.transition("test", MODEL, str(broken.version), "staging", "")
    async with Traffic(process.gateway, api_key, concurrency=2).running() as traffic:
        with pytest.raises(DeploymentError, match="could not load"):
            await registry_app.registry.transition("test", MODEL, str(broken.version), "production", "try it")
    assert traffic.failures == [] and set(traffic.served) == {str(serving)}
    assert await _production(registry_app) == serving
    assert (await registry_app.registry.resolve(MODEL, str(broken.version))).stage == "staging"
    actions = [e.action for e in await registry_app.registry.audit_entries(MODEL)]
    assert "deploy_failed" in actions


@pytest.mark.parametrize(
    ("fault", "expected_reason"),
    [
        ({"fault_error_rate": "1.0", "fault_after_batches": "5"}, "error rate"),  # passes warm-up, then fails
        ({"fault_delay_ms": "100"}, "latency p95"),
    ],
    ids=["errors", "10x-slower"],
)
async def test_bad_canary_is_rolled_back_automatically(registry_app: RegistryApp, mesh, fault, expected_reason):
    process, api_key = mesh
    stable = await _production(registry_app)
    bad = await registry_app.registry.register("test", MODEL, "", tabular_files(**fault), f"bad: {fault}")
    await registry_app.registry.transition("test", MODEL, str(bad.version), "staging", "")
    async with Traffic(process.gateway, api_key).running() as traffic:
        state = await registry_app.rollouts.start("test", MODEL, str(bad.version), steps=[0.2, 0.5, 1.0])
        outcome = await _wait_rollout_end(registry_app, state.id)
    state = registry_app.rollouts.get(state.id)
    assert outcome == "rolled_back", state
    assert expected_reason in state.reason
    assert state.canary_requests > 0 and state.time_to_rollback_s > 0
    print(f"\n{fault}: rolled back after {state.time_to_rollback_s:.2f}s; the bad version served "
          f"{state.canary_requests} requests ({traffic.served[str(bad.version)]} answered by it)")
    assert await _production(registry_app) == stable
    assert (await registry_app.registry.resolve(MODEL, str(bad.version))).stage == "archived"
    # Failed canary calls fell back to the stable version: callers saw no error.
    assert traffic.failures == [], traffic.failures[:5]
    actions = [e.action for e in await registry_app.registry.audit_entries(MODEL)]
    assert "rollout_start" in actions and "rollout_rolled_back" in actions


async def test_healthy_canary_ramps_and_is_promoted(registry_app: RegistryApp, mesh):
    process, api_key = mesh
    stable = await _production(registry_app)
    good = await registry_app.registry.register("test", MODEL, "", tabular_files(), "good candidate")
    await registry_app.registry.transition("test", MODEL, str(good.version), "staging", "")
    policy = "rules:\n  - error_rate.upper_ci <= 0.2\n  - requests.point >= 30\n"
    async with Traffic(process.gateway, api_key).running() as traffic:
        state = await registry_app.rollouts.start(
            "test", MODEL, str(good.version), steps=[0.1, 0.5, 1.0], policy_yaml=policy
        )
        outcome = await _wait_rollout_end(registry_app, state.id)
    state = registry_app.rollouts.get(state.id)
    assert outcome == "promoted", (state.reason, state.analyses)
    assert [a["verdict"] for a in state.analyses] == ["continue"] * 3
    assert await _production(registry_app) == good.version
    assert traffic.failures == []
    assert traffic.variants["canary"] > 0 and traffic.variants["stable"] > 0
    assert (await registry_app.registry.resolve(MODEL, str(stable))).stage == "archived"
    assert (await registry_app.registry.verify_audit()).ok


async def test_rollout_pause_resume_abort_and_illegal_requests(registry_app: RegistryApp, mesh):
    candidate = await registry_app.registry.register("test", MODEL, "", tabular_files(), "to abort")
    with pytest.raises(errors.FailedPrecondition, match="development"):
        await registry_app.rollouts.start("test", MODEL, str(candidate.version))
    await registry_app.registry.transition("test", MODEL, str(candidate.version), "staging", "")
    with pytest.raises(errors.InvalidArgument, match="steps"):
        await registry_app.rollouts.start("test", MODEL, str(candidate.version), steps=[0.5, 0.1])
    with pytest.raises(errors.InvalidArgument, match="policy_yaml"):
        await registry_app.rollouts.start("test", MODEL, str(candidate.version), policy_yaml="rules: [bogus >= ]")
    state = await registry_app.rollouts.start("test", MODEL, str(candidate.version), steps=[0.1, 1.0],
                                              step_duration_s=600)
    with pytest.raises(errors.FailedPrecondition, match="already has a rollout"):
        await registry_app.rollouts.start("test", MODEL, str(candidate.version))
    with pytest.raises(errors.FailedPrecondition, match="rollout in progress"):
        await registry_app.registry.transition("test", MODEL, str(candidate.version), "production", "")
    assert (await registry_app.rollouts.control("ops", state.id, "pause", "investigating")).state == "paused"
    assert (await registry_app.rollouts.control("ops", state.id, "resume", "")).state == "running"
    ended = await registry_app.rollouts.control("ops", state.id, "abort", "not today")
    assert ended.state == "aborted"
    assert (await registry_app.registry.resolve(MODEL, str(candidate.version))).stage == "staging"
    assert registry_app.registry.table.route(MODEL).experiment is None


async def test_versions_triton_forgot_are_pushed_again(registry_app: RegistryApp, mesh):
    """A restarted Triton has lost every pushed model; the registry's reconcile pass restores them."""
    process, api_key = mesh
    production = await registry_app.registry.production(MODEL)
    assert production is not None
    await registry_app.registry.deployer.unload(production.triton_model)  # what a Triton restart does
    assert not await registry_app.registry.deployer.is_ready(production.triton_model)
    assert await registry_app.registry.reconcile() == [production.triton_model]
    async with Traffic(process.gateway, api_key, concurrency=2).running() as traffic:
        await asyncio.sleep(0.5)
    assert traffic.failures == [] and traffic.served[str(production.version)] > 0


async def _cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_cli_lists_versions_verifies_audit_and_checks_policies(registry_app: RegistryApp, mesh):
    address = ["--registry", registry_app.address, "--actor", "cli-test"]
    code, out = await _cli("models", "list", MODEL, *address)
    assert code == 0 and "production" in out and "archived" in out, out
    code, out = await _cli("audit", "verify", *address)
    assert code == 0 and "audit chain intact" in out, out
    code, out = await _cli("policy", "check", "examples/policies/promotion.yaml", "examples/reports/eval_report.yaml",
                           *address)
    assert code == 0 and "GO" in out, out
    code, out = await _cli("models", "promote", MODEL, "999", *address)
    assert code == 1 and "NOT_FOUND" in out and "no version 999" in out, out


async def test_router_keeps_serving_when_the_registry_is_down(registry_app: RegistryApp, mesh):
    process, api_key = mesh
    assert registry_app.server is not None
    await registry_app.server.stop()
    try:
        async with Traffic(process.gateway, api_key, concurrency=2).running() as traffic:
            await asyncio.sleep(2.0)
        assert traffic.failures == [] and sum(traffic.served.values()) > 0
    finally:
        registry_app.server = None
