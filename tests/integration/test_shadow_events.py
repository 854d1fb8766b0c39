"""Shadow traffic becomes events too: marked as shadow, under its own prediction id."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import numpy as np

from services.common.api import common_pb2, events_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.kafka import KafkaSettings, ensure_topics, make_consumer
from services.common.routing import ModelRoute, RouteTable, RouteTarget, Shadow
from services.common.tansu import TansuBroker
from services.common.triton_server import TritonServer
from services.gateway.events_settings import EventSettings
from services.gateway.keys import KeyStore
from services.gateway.settings import GatewaySettings
from services.mesh import start_mesh
from services.router.settings import RouterSettings
from tests.integration.mesh_fixtures import GENEROUS_LIMITS

REQUESTS = 5


def _consume(kafka: KafkaSettings, expected: int, timeout_s: float = 30.0) -> list[events_pb2.PredictionEvent]:
    consumer = make_consumer(kafka, f"test-{uuid.uuid4().hex}", [kafka.predictions_topic])
    events: list[events_pb2.PredictionEvent] = []
    try:
        for _ in range(int(timeout_s / 0.2)):
            for batch in consumer.poll(timeout_ms=200).values():
                events.extend(events_pb2.PredictionEvent.FromString(m.value) for m in batch)
            if len(events) >= expected:
                break
    finally:
        consumer.close()
    return events


async def test_shadow_results_are_emitted_as_shadow_events(
    triton: TritonServer, kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    topic = f"shadow-test-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=kafka_broker.bootstrap, predictions_topic=topic)
    await asyncio.to_thread(ensure_topics, kafka, [topic])
    api_key = KeyStore(tmp_path / "keys.db").create("shadow", GENEROUS_LIMITS).api_key
    gateway_settings = GatewaySettings(
        port=0, keys_db=tmp_path / "keys.db",
        events=EventSettings.model_validate({"enabled": True, "kafka": kafka, "spool_dir": tmp_path / "spool"}),
    )
    mesh = await start_mesh({"gateway", "router"}, gateway_settings, RouterSettings(port=0, triton_url=triton.grpc_url))
    try:
        assert mesh.router is not None
        stable = RouteTarget("tabular_classifier", "", "1")
        await mesh.router.apply_table(
            RouteTable(1, (ModelRoute("tabular-classifier", "tabular", stable,
                                      shadows=(Shadow("candidate", RouteTarget("tabular_classifier", "", "2"), 1.0),)),))
        )
        features = np.zeros((1, 30), dtype="<f4")
        request = gateway_pb2.PredictRequest(
            model="tabular-classifier",
            inputs=[common_pb2.Tensor(name="features", dtype="FP32", shape=[1, 30], raw_data=features.tobytes())],
        )
        ids = []
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for _ in range(REQUESTS):
                response = await stub.Predict(request, metadata=[("authorization", f"Bearer {api_key}")], timeout=10)
                assert response.served_by.model_version == "1"  # the caller only ever sees stable
                ids.append(response.prediction_id)
        await mesh.router.wait_shadows()
    finally:
        await mesh.stop()  # flushes the emitter

    events = await asyncio.to_thread(_consume, kafka, 2 * REQUESTS)
    by_id = {e.prediction_id: e for e in events}
    assert len(events) == 2 * REQUESTS, [e.prediction_id for e in events]
    for prediction_id in ids:
        real = by_id[prediction_id]
        shadow = by_id[f"{prediction_id}~shadow-candidate"]
        assert not real.shadow and real.model_version == "1"
        assert shadow.shadow and shadow.model_version == "2" and shadow.variant == "candidate"
        assert shadow.status_code == "OK"
