"""The models in model_repository/, served by the real tritonserver binary (no mocks)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient, InferInput
from tritonclient.utils import InferenceServerException

from services.common.model_build.llm import greedy_chat_reply
from services.common.model_build.tabular import load_data, train_pipeline
from services.common.triton_server import TritonServer

pytestmark = pytest.mark.integration

# Generous: only a wedged server misses these.
STREAM_DEADLINE_S = 60.0
LOG_DEADLINE_S = 10.0
MALIGNANT, BENIGN = 0, 1


@dataclass(frozen=True)
class StreamedToken:
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int


def _from_result(result: InferResult) -> StreamedToken:
    return StreamedToken(
        text=result.as_numpy("text")[0].decode("utf-8"),
        finish_reason=result.as_numpy("finish_reason")[0].decode("utf-8"),
        input_tokens=int(result.as_numpy("input_tokens")[0]),
        output_tokens=int(result.as_numpy("output_tokens")[0]),
    )


def _scalar_input(name: str, datatype: str, value: np.ndarray) -> InferInput:
    tensor = InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _llm_request(
    prompt: str, max_tokens: int, temperature: float | None = None, seed: int | None = None
) -> dict[str, Any]:
    inputs = [
        _scalar_input("prompt", "BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_)),
        _scalar_input("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
    ]
    if temperature is not None:
        inputs.append(_scalar_input("temperature", "FP32", np.array([temperature], dtype=np.float32)))
    if seed is not None:
        inputs.append(_scalar_input("seed", "INT64", np.array([seed], dtype=np.int64)))
    return {"model_name": "llm", "inputs": inputs}


async def _one_request(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield request


async def _stream_llm(
    client: InferenceServerClient, prompt: str, max_tokens: int, **sampling: Any
) -> tuple[list[StreamedToken], list[InferenceServerException]]:
    """All responses of one request; the stream ends only after the FINAL response."""
    tokens: list[StreamedToken] = []
    errors: list[InferenceServerException] = []
    async for result, error in client.stream_infer(_one_request(_llm_request(prompt, max_tokens, **sampling))):
        if error is not None:
            errors.append(error)
        else:
            tokens.append(_from_result(result))
    return tokens, errors


def _features_input(rows: np.ndarray) -> InferInput:
    features = InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows.astype(np.float32))
    return features


async def test_tabular_batch_gives_labels_and_probabilities(triton_client: InferenceServerClient) -> None:
    rows = load_data().test_features[:3]
    result = await triton_client.infer("tabular_classifier", [_features_input(rows)])

    labels, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
    assert labels.shape == (3, 1)
    assert set(labels.ravel().tolist()) <= {MALIGNANT, BENIGN}
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


async def test_tabular_predictions_match_sklearn(triton_client: InferenceServerClient) -> None:
    features, targets = load_breast_cancer(return_X_y=True)
    known_rows = features[[int(np.argmax(targets == MALIGNANT)), int(np.argmax(targets == BENIGN))]]
    known_rows = known_rows.astype(np.float32)
    pipeline = train_pipeline(load_data())  # deterministic: the same model the ONNX came from

    result = await triton_client.infer("tabular_classifier", [_features_input(known_rows)])

    assert result.as_numpy("label").ravel().tolist() == [MALIGNANT, BENIGN]
    assert pipeline.predict(known_rows).tolist() == [MALIGNANT, BENIGN]
    np.testing.assert_allclose(result.as_numpy("probabilities"), pipeline.predict_proba(known_rows), atol=1e-4)


async def test_llm_streams_one_response_per_token_until_length(triton_client: InferenceServerClient) -> None:
    max_tokens = 12
    tokens, errors = await asyncio.wait_for(
        _stream_llm(triton_client, "What is the capital of France?", max_tokens), STREAM_DEADLINE_S
    )

    assert errors == []
    assert len(tokens) == max_tokens > 1
    assert [token.output_tokens for token in tokens] == list(range(1, max_tokens + 1))
    assert {token.finish_reason for token in tokens[:-1]} == {""}
    assert tokens[-1].finish_reason == "length"
    assert tokens[-1].output_tokens == max_tokens
    assert len({token.input_tokens for token in tokens}) == 1 and tokens[0].input_tokens > 0


async def test_llm_last_data_response_carries_final_flag(triton: TritonServer) -> None:
    # tritonclient's aio stream cannot ask for the flag; the raw KServe stub can.
    request = service_pb2.ModelInferRequest(model_name="llm")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(4)
    request.parameters["triton_enable_empty_final_response"].bool_param = True

    async with grpc.aio.insecure_channel(triton.grpc_url) as channel:
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]))
        responses = await asyncio.wait_for(_collect(stream), STREAM_DEADLINE_S)

    assert [response.error_message for response in responses] == [""] * 4
    final_flags = [response.infer_response.parameters["triton_final_response"].bool_param for response in responses]
    # The FINAL flag rides on the 4th token's response: no extra empty response follows.
    assert final_flags == [False, False, False, True]
    assert _from_result(InferResult(responses[-1].infer_response)).finish_reason == "length"


async def _collect(stream: AsyncIterator[service_pb2.ModelStreamInferResponse]) -> list[Any]:
    return [response async for response in stream]


async def test_llm_stream_matches_transformers_greedy_decoding(
    triton_client: InferenceServerClient, built_models: Any
) -> None:
    # Non-ASCII prompt and byte-level tokens: deltas must reassemble characters split across tokens.
    prompt, max_tokens = "Grüße aus München 🙂 東京", 24
    tokens, errors = await asyncio.wait_for(_stream_llm(triton_client, prompt, max_tokens), STREAM_DEADLINE_S)
    expected = await asyncio.to_thread(greedy_chat_reply, built_models.tiny_llm_dir, prompt, max_tokens)

    assert errors == []
    assert "".join(token.text for token in tokens) == expected


async def test_llm_sampling_is_reproducible_with_a_seed(triton_client: InferenceServerClient) -> None:
    async def sample(seed: int) -> str:
        tokens, errors = await asyncio.wait_for(
            _stream_llm(triton_client, "Once upon a time", 16, temperature=1.0, seed=seed), STREAM_DEADLINE_S
        )
        assert errors == [] and len(tokens) == 16
        return "".join(token.text for token in tokens)

    first, again, other_seed = await sample(7), await sample(7), await sample(8)
    greedy, _ = await _stream_llm(triton_client, "Once upon a time", 16)

    assert first == again
    # Near-uniform logits of the random tiny model: different seeds (or greedy) cannot coincide.
    assert first != other_seed
    assert first != "".join(token.text for token in greedy)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [("", 8, "prompt must not be empty"), ("Hello", 0, "max_tokens must be positive")],
)
async def test_llm_rejects_bad_input(
    triton_client: InferenceServerClient, prompt: str, max_tokens: int, message: str
) -> None:
    tokens, errors = await asyncio.wait_for(_stream_llm(triton_client, prompt, max_tokens), STREAM_DEADLINE_S)

    assert tokens == []
    assert len(errors) == 1
    assert message in errors[0].message()


async def _wait_for_log_line(log_path: Path, start_offset: int, pattern: re.Pattern[str]) -> re.Match[str]:
    deadline = asyncio.get_running_loop().time() + LOG_DEADLINE_S
    while True:
        with log_path.open("rb") as log_file:
            log_file.seek(start_offset)
            match = pattern.search(log_file.read().decode("utf-8", errors="replace"))
        if match or asyncio.get_running_loop().time() > deadline:
            assert match, f"{pattern.pattern!r} not in {log_path}"
            return match
        await asyncio.sleep(0.1)


async def test_cancelled_stream_stops_generation(triton: TritonServer, triton_client: InferenceServerClient) -> None:
    long_generation = 2000
    log_offset = triton.log_path.stat().st_size
    responses = triton_client.stream_infer(_one_request(_llm_request("Tell me a long story.", long_generation)))
    first_result, first_error = await asyncio.wait_for(anext(responses), STREAM_DEADLINE_S)
    assert first_error is None and _from_result(first_result).output_tokens == 1
    responses.cancel()  # the client hangs up

    # The model has a single instance: this completes only once the cancelled one has stopped.
    tokens, errors = await asyncio.wait_for(_stream_llm(triton_client, "Hello", 4), STREAM_DEADLINE_S)
    assert errors == [] and tokens[-1].finish_reason == "length"

    cancelled = await _wait_for_log_line(
        triton.log_path, log_offset, re.compile(rf"llm: request cancelled after (\d+) of {long_generation} tokens")
    )
    assert int(cancelled.group(1)) < long_generation
