from __future__ import annotations

import numpy as np
import pytest

from services.common.domain import (
    GenerateInput,
    GenerationUsage,
    PredictInput,
    PredictResult,
    ServedBy,
    TensorData,
)
from services.common.gen.mlmesh.v1 import events_pb2
from services.gateway.events import feedback_event, prediction_event, tensor_values
from services.gateway.hooks import CompletedRequest, FeedbackRecord

SERVED = ServedBy("tabular_classifier", "3", "exp-1", "canary")


def tensor(name: str, dtype: str, values: np.ndarray) -> TensorData:
    return TensorData(name, dtype, tuple(values.shape), values.astype(values.dtype.newbyteorder("<")).tobytes())


def predict_record(inputs: list[TensorData], outputs: list[TensorData] | None = None) -> CompletedRequest:
    request = PredictInput(model="tabular_classifier", inputs=inputs, request_id="req-1", unit_id="user-9")
    result = PredictResult("pid-1", SERVED, outputs) if outputs is not None else None
    return CompletedRequest(
        prediction_id="pid-1",
        tenant="acme",
        rpc="Predict",
        request=request,
        served_by=SERVED if result else None,
        status="OK" if result else "INVALID_ARGUMENT",
        error="" if result else "bad input",
        started_at_unix=1_700_000_000.25,
        latency_ms=2.5,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        result=result,
        extra={"shadow": "true", "span_id": "b7ad6b7169203331", "cost_usd": "0.002"},
    )


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"),
    [
        ("BOOL", "?"),
        ("UINT8", "u1"),
        ("UINT16", "u2"),
        ("UINT32", "u4"),
        ("UINT64", "u8"),
        ("INT8", "i1"),
        ("INT16", "i2"),
        ("INT32", "i4"),
        ("INT64", "i8"),
        ("FP16", "f2"),
        ("FP32", "f4"),
        ("FP64", "f8"),
    ],
)
def test_numeric_tensors_become_float64_values(dtype: str, numpy_dtype: str) -> None:
    values = (np.arange(6) % 2 if dtype == "BOOL" else np.arange(6) * 3).astype(numpy_dtype).reshape(2, 3)
    summary = tensor_values(tensor("x", dtype, values), capture_max_values=100)
    assert (summary.name, summary.dtype, list(summary.shape)) == ("x", dtype, [2, 3])
    assert list(summary.values) == values.astype(np.float64).ravel().tolist()
    assert not summary.truncated


@pytest.mark.parametrize(
    ("dtype", "raw"),
    [
        ("FP32", np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38], dtype="<f4")),
        ("FP16", np.array([6e-8, 65504.0, -np.inf, 0.1], dtype="<f2")),
        ("FP64", np.array([5e-324, 1.7976931348623157e308, np.nan], dtype="<f8")),
        ("UINT64", np.array([2**64 - 1, 2**53 + 1, 0], dtype="<u8")),
        ("INT64", np.array([-(2**63), 2**63 - 1, -1], dtype="<i8")),
        ("INT8", np.array([-128, 127, -1], dtype="<i1")),
        ("BOOL", np.frombuffer(b"\x00\x01\x02\xff", dtype="?")),  # any non-zero byte is true
    ],
)
def test_edge_values_decode_like_numpy_float64(dtype: str, raw: np.ndarray) -> None:
    expected = np.frombuffer(raw.tobytes(), dtype=raw.dtype).astype(np.float64)
    for count in (1, len(raw)):  # one decoder per (dtype, count): both must be right
        values = np.array(tensor_values(TensorData("x", dtype, (len(raw),), raw.tobytes()), count).values)
        np.testing.assert_array_equal(values, expected[:count])


def test_big_endian_hosts_are_not_assumed_values_are_little_endian() -> None:
    data = np.array([1.5, -2.0], dtype=">f4").astype("<f4").tobytes()
    assert list(tensor_values(TensorData("x", "FP32", (2,), data), 10).values) == [1.5, -2.0]


def test_values_are_capped_and_marked_truncated() -> None:
    summary = tensor_values(tensor("x", "FP32", np.arange(1000, dtype=np.float32).reshape(10, 100)), 256)
    assert len(summary.values) == 256
    assert summary.values[255] == 255.0
    assert summary.truncated
    assert list(summary.shape) == [10, 100]
    assert tensor_values(tensor("x", "FP32", np.ones(3, np.float32)), 0).truncated


def test_bytes_tensors_keep_only_their_shape() -> None:
    summary = tensor_values(TensorData("text", "BYTES", (2,), b"\x01\x00\x00\x00a\x01\x00\x00\x00b"), 256)
    assert (list(summary.shape), list(summary.values), summary.truncated) == ([2], [], False)


def test_a_rejected_request_with_short_data_does_not_crash() -> None:
    summary = tensor_values(TensorData("x", "FP32", (1, 30), b"\x00" * 10), 256)
    assert list(summary.values) == [0.0, 0.0]  # only the whole values that were really sent
    assert summary.truncated


def test_prediction_event_for_predict() -> None:
    x = tensor("x", "FP32", np.array([[0.5, 1.5]], dtype=np.float32))
    y = tensor("label", "INT64", np.array([1]))
    event = prediction_event(predict_record([x], [y]), 256)
    decoded = events_pb2.PredictionEvent.FromString(event.SerializeToString())
    assert decoded.schema_version == 1
    assert (decoded.prediction_id, decoded.request_id, decoded.tenant, decoded.unit_id) == (
        "pid-1",
        "req-1",
        "acme",
        "user-9",
    )
    assert (decoded.rpc, decoded.model, decoded.model_version, decoded.experiment, decoded.variant) == (
        "Predict",
        "tabular_classifier",
        "3",
        "exp-1",
        "canary",
    )
    assert decoded.started_at.ToNanoseconds() == 1_700_000_000_250_000_000
    assert decoded.latency_ms == 2.5
    assert decoded.status_code == "OK"
    assert list(decoded.inputs[0].values) == [0.5, 1.5]
    assert list(decoded.outputs[0].values) == [1.0]
    assert decoded.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert (decoded.shadow, decoded.span_id, decoded.cost_usd) == (True, "b7ad6b7169203331", 0.002)
    assert decoded.prompt == "" and decoded.input_tokens == 0


def test_failed_predict_names_the_requested_model_and_the_error() -> None:
    event = prediction_event(predict_record([tensor("x", "FP32", np.ones(2, np.float32))]), 256)
    assert (event.model, event.model_version, event.status_code, event.error_message) == (
        "tabular_classifier",
        "",
        "INVALID_ARGUMENT",
        "bad input",
    )
    assert len(event.inputs) == 1 and len(event.outputs) == 0


def test_prediction_event_for_generate() -> None:
    record = CompletedRequest(
        prediction_id="pid-2",
        tenant="acme",
        rpc="Generate",
        request=GenerateInput(model="llm", prompt="Capital of France?", max_tokens=16, temperature=0.5, top_p=0.9),
        served_by=ServedBy("llm", "1"),
        status="OK",
        error="",
        started_at_unix=1_700_000_000.0,
        latency_ms=120.0,
        trace_id="",
        completion_text="Paris.",
        finish_reason="stop",
        usage=GenerationUsage(input_tokens=5, output_tokens=2, time_to_first_token_ms=21.5, total_time_ms=120.0),
    )
    event = prediction_event(record, 256)
    assert (event.prompt, event.completion, event.finish_reason) == ("Capital of France?", "Paris.", "stop")
    assert (event.input_tokens, event.output_tokens, event.time_to_first_token_ms) == (5, 2, 21.5)
    assert (event.max_tokens, event.top_p) == (16, pytest.approx(0.9))
    assert event.temperature == pytest.approx(0.5)
    assert not event.inputs and not event.shadow


@pytest.mark.parametrize("rating", [None, 0.0, 4.5])
def test_feedback_event(rating: float | None) -> None:
    fb = FeedbackRecord("fb-1", "pid-1", "acme", "user-9", 1_700_000_100.5, "1", rating, "converted", "great", "t1")
    event = events_pb2.FeedbackEvent.FromString(feedback_event(fb).SerializeToString())
    assert (event.schema_version, event.feedback_id, event.prediction_id, event.tenant, event.unit_id) == (
        1,
        "fb-1",
        "pid-1",
        "acme",
        "user-9",
    )
    assert (event.label, event.outcome, event.text, event.trace_id) == ("1", "converted", "great", "t1")
    assert event.created_at.ToNanoseconds() == 1_700_000_100_500_000_000
    assert event.HasField("rating") == (rating is not None)
    if rating is not None:
        assert event.rating == rating
