"""Deployment shapes and failure modes: separate processes, Triton outages, graceful shutdown."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.net import free_port
from services.common.triton_server import TritonServer, load_model_sync
from services.gateway.keys import KeyStore
from tests.integration._mesh import MeshProcess
from tests.integration.conftest import MODEL_REPOSITORY
from tests.integration.mesh_fixtures import GENEROUS_LIMITS

ROW = np.linspace(0.1, 3.0, 30, dtype="<f4").reshape(1, 30)
PREDICT = gateway_pb2.PredictRequest(
    model="tabular-classifier",
    inputs=[common_pb2.Tensor(name="features", dtype="FP32", shape=[1, 30], raw_data=ROW.tobytes())],
)


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def new_key(keys_db: Path) -> str:
    return KeyStore(keys_db).create("resilience", GENEROUS_LIMITS).api_key


def test_gateway_and_router_in_separate_processes(triton: TritonServer, tmp_path: Path) -> None:
    keys_db = tmp_path / "keys.db"
    key = new_key(keys_db)
    router = MeshProcess("router", triton.grpc_url, keys_db, tmp_path / "router.log")
    gateway = MeshProcess(
        "gateway", triton.grpc_url, keys_db, tmp_path / "gateway.log", MLMESH_GATEWAY_ROUTER_ADDRESS=router.router
    )
    router.start()
    gateway.start()
    try:
        gateway.wait_serving(key, models=("tabular-classifier", "llm"))
        with grpc.insecure_channel(gateway.gateway) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            response = stub.Predict(PREDICT, metadata=auth(key), timeout=10)
            assert {t.name for t in response.outputs} == {"label", "probabilities"}
            chunks = list(
                stub.Generate(
                    gateway_pb2.GenerateRequest(
                        model="llm", prompt="hello", params=common_pb2.GenerationParams(max_tokens=5)
                    ),
                    metadata=auth(key),
                    timeout=60,
                )
            )
            assert chunks[-1].finish_reason and chunks[-1].usage.output_tokens > 0
            # errors raised in the router keep their status across the hop
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(
                    gateway_pb2.PredictRequest(model="llm", inputs=PREDICT.inputs), metadata=auth(key), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert gateway.stop() == 0, gateway.log_tail()
        assert router.stop() == 0, router.log_tail()


def test_triton_outage_gives_unavailable_then_recovers(built_models: object, tmp_path: Path) -> None:
    triton = TritonServer(MODEL_REPOSITORY, free_port(), free_port(), free_port(), log_path=tmp_path / "triton.log")
    keys_db = tmp_path / "keys.db"
    key = new_key(keys_db)
    mesh = MeshProcess("gateway,router", triton.grpc_url, keys_db, tmp_path / "mesh.log")
    triton.start()
    try:
        triton.wait_ready(60)
        load_model_sync(triton.grpc_url, "tabular_classifier")
        mesh.start()
        mesh.wait_serving(key, models=("tabular-classifier",))
        with grpc.insecure_channel(mesh.gateway) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            assert stub.Predict(PREDICT, metadata=auth(key), timeout=10).outputs

            triton.kill()
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(PREDICT, metadata=auth(key), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "unavailable" in info.value.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # the gateway itself survived

            triton.start()
            triton.wait_ready(60)
            load_model_sync(triton.grpc_url, "tabular_classifier")
            deadline, last_error = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                try:
                    assert stub.Predict(PREDICT, metadata=auth(key), timeout=5).outputs
                    break
                except grpc.RpcError as exc:
                    last_error = exc
                    time.sleep(0.2)
            else:
                pytest.fail(f"mesh did not recover after Triton came back: {last_error}")
    finally:
        if mesh.process is not None:
            assert mesh.stop() == 0, mesh.log_tail()
        triton.stop()


def test_sigterm_drains_in_flight_streams(triton: TritonServer, tmp_path: Path) -> None:
    keys_db = tmp_path / "keys.db"
    key = new_key(keys_db)
    mesh = MeshProcess("gateway,router", triton.grpc_url, keys_db, tmp_path / "mesh.log")
    mesh.start()
    try:
        mesh.wait_serving(key, models=("llm",))
        with grpc.insecure_channel(mesh.gateway) as channel:
            stream = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(
                    model="llm", prompt="drain me", params=common_pb2.GenerationParams(max_tokens=24)
                ),
                metadata=auth(key),
                timeout=60,
            )
            chunks = []
            for chunk in stream:
                if not chunks:
                    assert mesh.process is not None
                    mesh.process.send_signal(signal.SIGTERM)
                chunks.append(chunk)
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.output_tokens == 24
    finally:
        assert mesh.stop() == 0, mesh.log_tail()


def test_logger_is_hosted_by_configuration(kafka_broker: object, tmp_path: Path) -> None:
    """MLMESH_SERVICES=logger,... puts the logger (and its ClickHouse store) in the mesh process."""
    import os
    import subprocess
    import sys

    from services.common.api import logger_pb2, logger_pb2_grpc
    from services.common.settings import REPO_ROOT

    port = free_port()
    env = {
        **os.environ,
        "MLMESH_SERVICES": "logger",
        "MLMESH_LOGGER_PORT": str(port),
        "MLMESH_LOGGER_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'clickhouse'}",
        "MLMESH_LOGGER_PII_HASH_SALT": "test",
        "MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,  # type: ignore[attr-defined]
    }
    log = (tmp_path / "mesh.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "services.mesh"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline, rows = time.monotonic() + 60, None
        while time.monotonic() < deadline and rows is None:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    rows = logger_pb2_grpc.LoggerStub(channel).Query(
                        logger_pb2.QueryRequest(sql="SELECT count() FROM predictions"), timeout=5
                    ).rows
            except grpc.RpcError:
                time.sleep(0.3)
        assert rows == ["[0]"], (tmp_path / "mesh.log").read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "mesh.log").read_text()[-3000:]
