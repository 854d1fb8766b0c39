"""The router's Triton connection against the real tritonserver: Predicts on per-model
ModelStreamInfer streams behave like unary ModelInfer calls (results, statuses, deadlines), and
the batcher's adaptive gathering merges closed-loop callers without holding lone ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from services.common import errors
from services.common.domain import TensorData
from services.common.triton_server import TritonServer
from services.router.batching import PredictBatcher
from services.router.triton import TritonBackend
from tests.integration.model_copies import loaded_copies

pytestmark = pytest.mark.integration

SLOW_MS = 400
MODEL = "tabular_classifier"
SLOW = "backend_slow"
COPY = "backend_copy"
OUTPUTS = ["label", "probabilities"]
ROWS = load_breast_cancer().data.astype(np.float32)


@pytest.fixture(scope="module")
async def copies(triton: TritonServer) -> AsyncIterator[None]:
    async with loaded_copies(triton.grpc_url, {SLOW: {"fault_delay_ms": str(SLOW_MS)}, COPY: {}}):
        yield


@pytest.fixture(params=[True, False], ids=["stream", "unary"])
async def backend(request: pytest.FixtureRequest, triton: TritonServer) -> AsyncIterator[TritonBackend]:
    client = TritonBackend(triton.grpc_url, predict_stream=request.param)
    yield client
    await client.close()


def features(rows: np.ndarray) -> list[TensorData]:
    return [TensorData("features", "FP32", rows.shape, rows.astype("<f4").tobytes())]


def labels(outputs: list[TensorData]) -> list[int]:
    label = next(o for o in outputs if o.name == "label")
    return np.frombuffer(label.data, dtype="<i8").tolist()


async def test_batch_results_are_the_same_through_stream_and_unary(triton: TritonServer) -> None:
    stream, unary = TritonBackend(triton.grpc_url, True), TritonBackend(triton.grpc_url, False)
    try:
        rows = ROWS[:64]
        streamed = await stream.infer(MODEL, "", features(rows), OUTPUTS, "same", 10.0)
        direct = await unary.infer(MODEL, "", features(rows), OUTPUTS, "same", 10.0)
    finally:
        await stream.close()
        await unary.close()
    assert [(o.name, o.dtype, o.shape, o.data) for o in streamed] == [(o.name, o.dtype, o.shape, o.data) for o in direct]
    assert streamed[0].shape == (64, 1) and set(labels(streamed)) == {0, 1}


async def test_concurrent_requests_get_their_own_answers(backend: TritonBackend) -> None:
    """Many requests in flight on one stream, same request id: each answer is matched to its caller."""
    singles = [ROWS[i : i + 1] for i in range(0, 200, 5)]
    expected = [labels(await backend.infer(MODEL, "", features(r), OUTPUTS, "solo", 10.0)) for r in singles[:3]]
    answers = await asyncio.gather(*(backend.infer(MODEL, "", features(r), OUTPUTS, "dup-id", 10.0) for r in singles))
    assert [labels(a) for a in answers[:3]] == expected
    batch = labels(await backend.infer(MODEL, "", features(np.concatenate(singles)), OUTPUTS, "all", 10.0))
    assert [labels(a)[0] for a in answers] == batch


def _with_cols(cols: int) -> list[TensorData]:
    return [TensorData("features", "FP32", (1, cols), bytes(4 * cols))]


BAD_REQUESTS = {
    "unknown model": ("no_such_model", "", _with_cols(30), errors.NotFound, "not loaded"),
    "unknown version": (MODEL, "9", _with_cols(30), errors.NotFound, "not loaded"),
    "wrong shape": (MODEL, "", _with_cols(29), errors.InvalidArgument, "unexpected shape"),
    "wrong dtype": (MODEL, "", [TensorData("features", "FP64", (1, 30), bytes(240))], errors.InvalidArgument, "FP64"),
    "byte size": (MODEL, "", [TensorData("features", "FP32", (1, 30), bytes(7))], errors.InvalidArgument, "byte size"),
    "batch too large": (MODEL, "", features(np.zeros((300, 30))), errors.InvalidArgument, "<= 256"),
    "unknown input": (MODEL, "", [TensorData("nope", "FP32", (1, 30), bytes(120))], errors.InvalidArgument, "nope"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_the_same_status_as_unary_calls(backend: TritonBackend, case: str) -> None:
    model, version, inputs, expected, phrase = BAD_REQUESTS[case]
    with pytest.raises(expected, match=phrase):
        await backend.infer(model, version, inputs, OUTPUTS, "bad", 10.0)
    # The stream (or channel) still serves the next request.
    assert labels(await backend.infer(MODEL, "", features(ROWS[:2]), OUTPUTS, "after", 10.0))


async def test_model_failures_are_internal_errors(triton: TritonServer, backend: TritonBackend) -> None:
    async with loaded_copies(triton.grpc_url, {"backend_failing": {"fault_error_rate": "1.0"}}):
        with pytest.raises(errors.Internal, match="injected fault"):
            await backend.infer("backend_failing", "", features(ROWS[:1]), OUTPUTS, "fail", 10.0)


async def test_slow_model_does_not_hold_up_another_model(backend: TritonBackend, copies: None) -> None:
    """Triton answers a stream in request order: each model must have its own stream."""
    slow = asyncio.ensure_future(backend.infer(SLOW, "", features(ROWS[:1]), OUTPUTS, "slow", 10.0))
    await asyncio.sleep(0.05)  # the slow request is sent first
    started = time.monotonic()
    await backend.infer(COPY, "", features(ROWS[:1]), OUTPUTS, "fast", 10.0)
    fast_s = time.monotonic() - started
    assert not slow.done() and fast_s < SLOW_MS / 1000 / 2, f"the fast model waited {fast_s:.3f} s"
    assert labels(await slow)


async def test_deadline_is_kept_and_the_late_answer_is_dropped(backend: TritonBackend, copies: None) -> None:
    with pytest.raises(errors.DeadlineExceeded, match=SLOW):
        await backend.infer(SLOW, "", features(ROWS[:1]), OUTPUTS, "late", SLOW_MS / 1000 / 4)
    # The late answer arrives on the same stream and must not be given to the next caller.
    assert labels(await backend.infer(SLOW, "", features(ROWS[1:2]), OUTPUTS, "next", 10.0)) == labels(
        await backend.infer(MODEL, "", features(ROWS[1:2]), OUTPUTS, "check", 10.0)
    )


async def test_a_cancelled_caller_leaves_the_stream_serving(backend: TritonBackend, copies: None) -> None:
    waiting = asyncio.ensure_future(backend.infer(SLOW, "", features(ROWS[:1]), OUTPUTS, "gone", 10.0))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert labels(await backend.infer(SLOW, "", features(ROWS[:1]), OUTPUTS, "stays", 10.0))


async def test_open_streams_are_bounded(triton: TritonServer, copies: None) -> None:
    """Every registry version is its own Triton model: streams to old ones are closed, not kept."""
    backend = TritonBackend(triton.grpc_url, max_open_streams=1)
    try:
        await backend.infer(MODEL, "", features(ROWS[:1]), OUTPUTS, "a", 10.0)
        first = backend._streams[(MODEL, "")]
        await backend.infer(COPY, "", features(ROWS[:1]), OUTPUTS, "b", 10.0)
        assert list(backend._streams) == [(COPY, "")]
        for _ in range(100):
            if first.closed and first._reader.done():
                break
            await asyncio.sleep(0.02)
        assert first.closed and first._reader.done()
        # The evicted model is served again on a fresh stream.
        assert labels(await backend.infer(MODEL, "", features(ROWS[:1]), OUTPUTS, "c", 10.0))
    finally:
        await backend.close()


class RecordingBackend(TritonBackend):
    """The real backend, noting the rows of every call the batcher makes."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[int] = []

    async def infer(self, model: str, version: str, inputs: list[TensorData], *args: Any) -> list[TensorData]:
        self.calls.append(inputs[0].shape[0])
        return await super().infer(model, version, inputs, *args)


@pytest.fixture
async def recording(triton: TritonServer) -> AsyncIterator[RecordingBackend]:
    client = RecordingBackend(triton.grpc_url)
    yield client
    await client.close()


async def _caller(batcher: PredictBatcher, rows: np.ndarray, calls: int, timeout_s: float = 10.0) -> list[int]:
    got = []
    for _ in range(calls):
        got += labels(await batcher.infer(MODEL, "", 256, features(rows), OUTPUTS, "caller", timeout_s))
    return got


async def test_gathering_merges_returning_callers_into_one_call(recording: RecordingBackend) -> None:
    """Four closed-loop callers: once they are in step, every Triton call carries all four."""
    batcher = PredictBatcher(recording, gather_max_s=1.0)
    expected = labels(await recording.infer(MODEL, "", features(ROWS[:4]), OUTPUTS, "expected", 10.0))
    recording.calls.clear()
    # The first caller went alone, so it finishes a round early and the last round waits out the
    # 1 s cap once. A gathering that never completed would wait it out every round (10 s).
    results = await asyncio.wait_for(
        asyncio.gather(*(_caller(batcher, ROWS[i : i + 1], 10) for i in range(4))), timeout=6.0
    )
    assert [r[0] for r in results] == expected and all(len(set(r)) == 1 for r in results)
    assert sum(recording.calls) == 40
    assert recording.calls[-6:-1] == [4] * 5, str(recording.calls)


async def test_gathering_never_holds_a_lone_caller(recording: RecordingBackend) -> None:
    batcher = PredictBatcher(recording, gather_max_s=5.0)
    await asyncio.wait_for(_caller(batcher, ROWS[:1], 20), timeout=4.0)  # held, it would take 100 s
    assert recording.calls == [1] * 20


async def test_gathering_adapts_when_callers_leave(recording: RecordingBackend) -> None:
    """Two of four callers stop: one gathering runs out (the cap), then calls carry the two left."""
    batcher = PredictBatcher(recording, gather_max_s=0.3)
    await asyncio.wait_for(asyncio.gather(*(_caller(batcher, ROWS[i : i + 1], 5) for i in range(4))), timeout=6.0)
    recording.calls.clear()
    await asyncio.wait_for(asyncio.gather(*(_caller(batcher, ROWS[i : i + 1], 10) for i in range(2))), timeout=6.0)
    assert sum(recording.calls) == 20 and recording.calls[-5:] == [2] * 5, recording.calls


async def test_a_deadline_ends_a_gathering_wait(recording: RecordingBackend) -> None:
    batcher = PredictBatcher(recording, gather_max_s=5.0)
    await asyncio.gather(*(_caller(batcher, ROWS[i : i + 1], 1) for i in range(4)))  # calls of 1 then 3: the target is 3 (3 back, none waiting)
    with pytest.raises(errors.DeadlineExceeded):
        await asyncio.wait_for(_caller(batcher, ROWS[:1], 1, timeout_s=0.2), timeout=4.0)
    assert recording.calls == [1, 3]  # the lone request was never sent
