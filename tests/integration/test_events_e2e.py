"""Through the public API to the analytics store: gateway -> Kafka (Tansu) -> logger -> ClickHouse (chdb)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc, logger_pb2, logger_pb2_grpc
from services.common.kafka import KafkaSettings, ensure_topics
from services.common.net import free_port
from services.common.settings import REPO_ROOT
from services.common.tansu import TansuBroker
from services.common.triton_server import TritonServer
from services.gateway.keys import KeyStore
from tests.integration._mesh import MeshProcess
from tests.integration.mesh_fixtures import GENEROUS_LIMITS

PII_PROMPT = "Mail jane.doe@example.com or call +1 415 555 0100 about card 4111 1111 1111 1111"


def _query(logger: str, sql: str) -> list[list]:
    with grpc.insecure_channel(logger) as channel:
        reply = logger_pb2_grpc.LoggerStub(channel).Query(logger_pb2.QueryRequest(sql=sql), timeout=30)
    return [json.loads(row) for row in reply.rows]


def _wait_rows(logger: str, sql: str, expected: int, timeout_s: float = 60.0) -> list[list]:
    deadline, rows = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            rows = _query(logger, sql)
        except grpc.RpcError:
            rows = []
        if len(rows) >= expected:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"expected {expected} rows from {sql!r}, got {rows}")


@pytest.fixture(scope="module")
def analytics_mesh(triton: TritonServer, kafka_broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("events-e2e")
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "PREDICTIONS_TOPIC": f"e2e.predictions.{suffix}",
        "FEEDBACK_TOPIC": f"e2e.feedback.{suffix}",
        "ALERTS_TOPIC": f"e2e.alerts.{suffix}",
        "DEADLETTER_TOPIC": f"e2e.deadletter.{suffix}",
    }
    ensure_topics(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap, **{k.lower(): v for k, v in topics.items()}))
    logger_port = free_port()
    logger_env = {
        **os.environ,
        "MLMESH_LOGGER_PORT": str(logger_port),
        "MLMESH_LOGGER_CLICKHOUSE_DSN": f"chdb://{workdir / 'clickhouse'}",
        "MLMESH_LOGGER_GROUP_ID": f"e2e-logger-{suffix}",
        "MLMESH_LOGGER_PII_HASH_SALT": "test-salt",
        "MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        **{f"MLMESH_LOGGER_KAFKA__{k}": v for k, v in topics.items()},
    }
    log = (workdir / "logger.log").open("ab")
    logger = subprocess.Popen([sys.executable, "-m", "services.logger"], cwd=REPO_ROOT, env=logger_env, stdout=log, stderr=log)
    keys_db = workdir / "keys.db"
    api_key = KeyStore(keys_db).create("events", GENEROUS_LIMITS).api_key
    mesh = MeshProcess(
        "gateway,router",
        triton.grpc_url,
        keys_db,
        workdir / "mesh.log",
        MLMESH_GATEWAY_EVENTS__ENABLED="true",
        MLMESH_GATEWAY_EVENTS__SPOOL_DIR=str(workdir / "spool"),
        MLMESH_GATEWAY_EVENTS__KAFKA__BOOTSTRAP_SERVERS=kafka_broker.bootstrap,
        **{f"MLMESH_GATEWAY_EVENTS__KAFKA__{k}": v for k, v in topics.items()},
    )
    mesh.start()
    try:
        mesh.wait_serving(api_key, models=("tabular-classifier", "llm"))
        yield {"gateway": mesh.gateway, "logger": f"127.0.0.1:{logger_port}", "api_key": api_key}
    finally:
        assert mesh.stop() == 0, mesh.log_tail()
        logger.send_signal(signal.SIGTERM)
        assert logger.wait(30) == 0, Path(log.name).read_text()[-3000:]


def test_predictions_and_feedback_become_redacted_rows(analytics_mesh: dict) -> None:
    metadata = [("authorization", f"Bearer {analytics_mesh['api_key']}")]
    # The caller's W3C trace context: its trace id must be the one the event carries.
    caller_trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = [*metadata, ("traceparent", f"00-{caller_trace_id}-00f067aa0ba902b7-01")]
    row = np.linspace(0.5, 2.0, 30, dtype="<f4").reshape(1, 30)
    with grpc.insecure_channel(analytics_mesh["gateway"]) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        predicted = gateway.Predict(
            gateway_pb2.PredictRequest(
                model="tabular-classifier",
                unit_id="user-42",
                inputs=[common_pb2.Tensor(name="features", dtype="FP32", shape=[1, 30], raw_data=row.tobytes())],
            ),
            metadata=traced,
            timeout=10,
        )
        chunks = list(
            gateway.Generate(
                gateway_pb2.GenerateRequest(
                    model="llm", prompt=PII_PROMPT, unit_id="user-42", params=common_pb2.GenerationParams(max_tokens=6)
                ),
                metadata=metadata,
                timeout=60,
            )
        )
        gateway.Feedback(
            gateway_pb2.FeedbackRequest(prediction_id=predicted.prediction_id, label="1", rating=4.0, unit_id="user-42"),
            metadata=metadata,
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as info:
            gateway.Feedback(gateway_pb2.FeedbackRequest(prediction_id=predicted.prediction_id), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    logger = analytics_mesh["logger"]
    rows = _wait_rows(
        logger,
        "SELECT p.prediction_id, p.model, p.model_version, p.unit_id, length(p.input_values), f.label, f.rating "
        "FROM (SELECT * FROM predictions FINAL) AS p INNER JOIN (SELECT * FROM feedback FINAL) AS f "
        f"ON f.prediction_id = p.prediction_id WHERE p.prediction_id = '{predicted.prediction_id}'",
        1,
    )
    assert rows == [[predicted.prediction_id, "tabular-classifier", "1", "user-42", 30, "1", 4.0]]
    trace_ids = _wait_rows(
        logger, f"SELECT trace_id FROM predictions FINAL WHERE prediction_id = '{predicted.prediction_id}'", 1
    )
    assert trace_ids == [[caller_trace_id]]

    generated = _wait_rows(
        logger,
        f"SELECT prompt, output_tokens, finish_reason FROM predictions FINAL WHERE prediction_id = '{chunks[-1].prediction_id}'",
        1,
    )
    prompt, output_tokens, finish_reason = generated[0]
    assert output_tokens == chunks[-1].usage.output_tokens and finish_reason == chunks[-1].finish_reason
    for probe in ("jane.doe@example.com", "555 0100", "4111 1111 1111 1111"):
        assert probe not in prompt
    assert "[EMAIL]" in prompt and "[CARD]" in prompt
