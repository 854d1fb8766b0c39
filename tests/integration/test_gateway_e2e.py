"""End to end through the public gateway API only, against real Triton and a mesh subprocess."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.keys import KeyStore
from services.gateway.settings import TenantLimits
from tests.integration._mesh import MeshEndpoint


def features(rows: int = 1, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data.astype(np.float32)
    return data[np.random.default_rng(seed).choice(len(data), rows, replace=False)]


def predict_request(x: np.ndarray, model: str = "tabular-classifier", **tensor: object) -> gateway_pb2.PredictRequest:
    fields = {"name": "features", "dtype": "FP32", "shape": list(x.shape), "raw_data": x.astype("<f4").tobytes()}
    fields.update(tensor)
    return gateway_pb2.PredictRequest(model=model, inputs=[common_pb2.Tensor(**fields)])


def generate_request(
    prompt: str = "What is the capital of France?", max_tokens: int = 8
) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        model="llm", prompt=prompt, params=common_pb2.GenerationParams(max_tokens=max_tokens)
    )


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


@pytest.fixture
async def gateway(mesh_endpoint: MeshEndpoint):
    async with grpc.aio.insecure_channel(mesh_endpoint.gateway) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


async def test_predict_returns_classes_probabilities_and_provenance(gateway, mesh_endpoint: MeshEndpoint) -> None:
    x = features(rows=5)
    response = await gateway.Predict(predict_request(x), metadata=auth(mesh_endpoint.api_key), timeout=10)
    outputs = {t.name: t for t in response.outputs}
    probabilities = np.frombuffer(outputs["probabilities"].raw_data, "<f4").reshape(outputs["probabilities"].shape)
    labels = np.frombuffer(outputs["label"].raw_data, "<i8").reshape(-1)
    assert probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert labels.tolist() == probabilities.argmax(axis=1).tolist()
    assert len(response.prediction_id) == 32
    assert response.served_by.model == "tabular-classifier"
    assert response.served_by.model_version == "1"


async def test_every_prediction_gets_its_own_id(gateway, mesh_endpoint: MeshEndpoint) -> None:
    calls = [
        gateway.Predict(predict_request(features(seed=i)), metadata=auth(mesh_endpoint.api_key)) for i in range(20)
    ]
    ids = {r.prediction_id for r in await asyncio.gather(*calls)}
    assert len(ids) == 20


async def test_generate_streams_tokens_and_reports_usage_last(gateway, mesh_endpoint: MeshEndpoint) -> None:
    chunks = [c async for c in gateway.Generate(generate_request(max_tokens=12), metadata=auth(mesh_endpoint.api_key))]
    assert len(chunks) > 1
    *body, last = chunks
    assert all(not c.finish_reason and not c.HasField("usage") for c in body)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert last.finish_reason in {"length", "stop"}
    assert last.usage.output_tokens == (12 if last.finish_reason == "length" else last.usage.output_tokens)
    assert last.usage.input_tokens > 0
    assert 0 < last.usage.time_to_first_token_ms <= last.usage.total_time_ms
    assert chunks[0].served_by.model == "llm" and chunks[0].served_by.model_version
    assert len({c.prediction_id for c in chunks}) == 1


async def test_unknown_methods_get_unimplemented_and_serving_goes_on(gateway, mesh_endpoint: MeshEndpoint) -> None:
    async with grpc.aio.insecure_channel(mesh_endpoint.gateway) as channel:
        for name in ("/mlmesh.v1.Gateway/NoSuchMethod", "/no.such.Service/Predict", "/mlmesh.v1.Gateway/x1"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(name)(b"", metadata=auth(mesh_endpoint.api_key), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    response = await gateway.Predict(predict_request(features()), metadata=auth(mesh_endpoint.api_key), timeout=10)
    assert len(response.outputs) == 2


@pytest.mark.parametrize(
    ("request_factory", "code", "message"),
    [
        (
            lambda: predict_request(features().astype(np.float64), dtype="FP64"),
            "INVALID_ARGUMENT",
            "dtype: expected FP32",
        ),
        (lambda: predict_request(features(), shape=[1, 29]), "INVALID_ARGUMENT", "shape[1]: expected 30, got 29"),
        (lambda: predict_request(features(), raw_data=b"\x00" * 7), "INVALID_ARGUMENT", "needs 120 bytes, got 7"),
        (lambda: predict_request(features(), name="pixels"), "INVALID_ARGUMENT", "has no input 'pixels'"),
        (lambda: predict_request(features(), model="nope"), "NOT_FOUND", "unknown model 'nope'"),
        (lambda: predict_request(features(), model=""), "INVALID_ARGUMENT", "model: must not be empty"),
        (lambda: predict_request(features(), model="llm"), "INVALID_ARGUMENT", "call Generate"),
    ],
)
async def test_malformed_predict_gets_a_clear_status(gateway, mesh_endpoint, request_factory, code, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.Predict(request_factory(), metadata=auth(mesh_endpoint.api_key), timeout=10)
    assert info.value.code().name == code
    assert message in info.value.details()


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [("", 8, "prompt: must not be empty"), ("   \n", 8, "prompt: must not be empty"), ("hi", 100_000, "max_tokens")],
)
async def test_malformed_generate_gets_invalid_argument(gateway, mesh_endpoint, prompt, max_tokens, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.Generate(generate_request(prompt, max_tokens), metadata=auth(mesh_endpoint.api_key)):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


async def test_missing_and_wrong_keys_are_unauthenticated(gateway, mesh_endpoint: MeshEndpoint) -> None:
    for metadata in ([], auth("mlm_000000000000_wrong"), [("authorization", "Basic abc")]):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.Predict(predict_request(features()), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    response = await gateway.Predict(
        predict_request(features()), metadata=[("x-api-key", mesh_endpoint.api_key)], timeout=10
    )
    assert response.prediction_id


async def test_100mb_payload_is_refused_and_the_gateway_keeps_serving(gateway, mesh_endpoint: MeshEndpoint) -> None:
    huge = predict_request(features(), raw_data=b"\x00" * (100 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.Predict(huge, metadata=auth(mesh_endpoint.api_key), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(mesh_endpoint.gateway) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (await gateway.Predict(predict_request(features()), metadata=auth(mesh_endpoint.api_key))).outputs


async def test_request_rate_limit_answers_resource_exhausted_with_retry_hint(gateway, mesh_endpoint) -> None:
    key = KeyStore(mesh_endpoint.keys_db).create("tiny-tenant", TenantLimits(requests_per_s=0.5, burst=2)).api_key
    for _ in range(2):
        await gateway.Predict(predict_request(features()), metadata=auth(key), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.Predict(predict_request(features()), metadata=auth(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tiny-tenant" in info.value.details()
    retry_ms = dict(info.value.trailing_metadata())["retry-after-ms"]
    assert 0 < int(retry_ms) <= 2000
    # another tenant is unaffected
    await gateway.Predict(predict_request(features()), metadata=auth(mesh_endpoint.api_key), timeout=10)


async def test_token_budget_limits_generation(gateway, mesh_endpoint: MeshEndpoint) -> None:
    key = KeyStore(mesh_endpoint.keys_db).create("token-tenant", TenantLimits(tokens_per_min=20)).api_key
    first = [c async for c in gateway.Generate(generate_request(max_tokens=30), metadata=auth(key))]
    assert first[-1].usage.output_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.Generate(generate_request(max_tokens=4), metadata=auth(key)):
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens/min" in info.value.details()


async def test_client_hangup_stops_generation(gateway, mesh_endpoint: MeshEndpoint) -> None:
    call = gateway.Generate(generate_request(max_tokens=2000), metadata=auth(mesh_endpoint.api_key))
    received = 0
    async for _ in call:
        received += 1
        if received == 2:
            call.cancel()
            break
    # The LLM has one instance: the next request only finishes in time if generation stopped.
    chunks = [
        c
        async for c in gateway.Generate(
            generate_request(max_tokens=4), metadata=auth(mesh_endpoint.api_key), timeout=60
        )
    ]
    assert chunks[-1].finish_reason


async def test_deadline_is_propagated(gateway, mesh_endpoint: MeshEndpoint) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.Generate(
            generate_request(max_tokens=2000), metadata=auth(mesh_endpoint.api_key), timeout=1.0
        ):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    chunks = [
        c
        async for c in gateway.Generate(
            generate_request(max_tokens=4), metadata=auth(mesh_endpoint.api_key), timeout=60
        )
    ]
    assert chunks[-1].finish_reason


async def test_list_models_describes_tensor_contracts(gateway, mesh_endpoint: MeshEndpoint) -> None:
    models = {
        m.name: m
        for m in (
            await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(mesh_endpoint.api_key))
        ).models
    }
    tabular = models["tabular-classifier"]
    assert tabular.ready and tabular.kind == "tabular" and tabular.max_batch_size > 0
    assert [(s.name, s.dtype, list(s.shape)) for s in tabular.inputs] == [("features", "FP32", [-1, 30])]
    assert models["llm"].kind == "llm"


async def test_concurrent_predictions_each_get_their_own_answer(gateway, mesh_endpoint: MeshEndpoint) -> None:
    """Under concurrency the router merges requests into one Triton call; answers must not mix."""
    batches = [features(rows=1 + i % 3, seed=100 + i) for i in range(48)]
    alone = [await gateway.Predict(predict_request(x), metadata=auth(mesh_endpoint.api_key)) for x in batches]
    together = await asyncio.gather(
        *(gateway.Predict(predict_request(x), metadata=auth(mesh_endpoint.api_key)) for x in batches)
    )
    for x, a, b in zip(batches, alone, together, strict=True):
        for out_a, out_b in zip(a.outputs, b.outputs, strict=True):
            assert out_a.name == out_b.name and list(out_a.shape) == list(out_b.shape) and out_a.shape[0] == len(x)
            np.testing.assert_allclose(
                np.frombuffer(out_a.raw_data, "<f4" if out_a.dtype == "FP32" else "<i8"),
                np.frombuffer(out_b.raw_data, "<f4" if out_b.dtype == "FP32" else "<i8"),
                rtol=1e-4,
                atol=1e-6,  # batched float math may differ in the last bits
            )
