"""The wire format between the gateway and its event process: plain tuples that marshal encodes
and that rebuild records equal to the originals."""

from __future__ import annotations

import marshal

import numpy as np
import pytest

from services.common.domain import (
    DTYPE_ITEMSIZE,
    GenerateInput,
    GenerationUsage,
    PredictInput,
    PredictResult,
    ServedBy,
    TensorData,
)
from services.common.kafka import KafkaSettings
from services.gateway.event_process import (
    _SETTINGS_ENV,
    FEEDBACK,
    PREDICTION,
    EventProcess,
    _child_env,
    record_from_wire,
    record_to_wire,
    stall_seconds,
)
from services.gateway.events import EventEmitter, prediction_event
from services.gateway.events_settings import EventSettings
from services.gateway.hooks import CompletedRequest, FeedbackRecord

SERVED = ServedBy("tabular_classifier", "3", "exp-1", "canary")


def predict_record() -> CompletedRequest:
    features = TensorData("features", "FP32", (1, 3), np.array([[0.5, -1.5, 2.0]], dtype="<f4").tobytes())
    mask = TensorData("mask", "BOOL", (1, 3), b"\x01\x00\x01")
    label = TensorData("label", "INT64", (1,), np.array([1], dtype="<i8").tobytes())
    return CompletedRequest(
        prediction_id="pid-1",
        tenant="acme",
        rpc="Predict",
        request=PredictInput(
            model="tabular_classifier",
            inputs=[features, mask],
            outputs=["label", "probabilities"],
            request_id="req-1",
            unit_id="user-9",
        ),
        served_by=SERVED,
        status="OK",
        error="",
        started_at_unix=1_700_000_000.25,
        latency_ms=2.5,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        result=PredictResult("pid-1", SERVED, [label]),
        extra={"shadow": "true", "span_id": "b7ad6b7169203331", "cost_usd": "0.002"},
    )


def failed_predict_record() -> CompletedRequest:
    return CompletedRequest(
        prediction_id="pid-2",
        tenant="acme",
        rpc="Predict",
        request=PredictInput(
            model="tabular_classifier", inputs=[TensorData("features", "FP32", (1, 30), b"\x00" * 10)]
        ),
        served_by=None,
        status="INVALID_ARGUMENT",
        error="features: expected 120 bytes, got 10",
        started_at_unix=1_700_000_001.0,
        latency_ms=0.125,
        trace_id="",
    )


def generate_record() -> CompletedRequest:
    return CompletedRequest(
        prediction_id="pid-3",
        tenant="acme",
        rpc="Generate",
        request=GenerateInput(
            model="llm",
            prompt="Once upon a time ✨",
            max_tokens=16,
            temperature=0.7,
            top_p=0.9,
            seed=42,
            request_id="req-3",
            unit_id="user-1",
        ),
        served_by=ServedBy("llm", "1"),
        status="OK",
        error="",
        started_at_unix=1_700_000_002.5,
        latency_ms=50.0,
        trace_id="1" * 32,
        completion_text=" there was a mesh",
        finish_reason="length",
        usage=GenerationUsage(input_tokens=5, output_tokens=16, time_to_first_token_ms=12.5, total_time_ms=50.0),
    )


def feedback_record(rating: float | None) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id="fb-1",
        prediction_id="pid-1",
        tenant="acme",
        unit_id="user-9",
        created_at_unix=1_700_000_003.75,
        label="1",
        rating=rating,
        outcome="converted",
        text="great",
        trace_id="2" * 32,
    )


@pytest.mark.parametrize(
    ("kind", "item"),
    [
        (PREDICTION, predict_record()),
        (PREDICTION, failed_predict_record()),
        (PREDICTION, generate_record()),
        (FEEDBACK, feedback_record(None)),
        (FEEDBACK, feedback_record(4.5)),
    ],
    ids=["predict", "failed-predict", "generate", "feedback-no-rating", "feedback-rating"],
)
def test_round_trip_through_marshal_gives_an_equal_record(kind: int, item: CompletedRequest | FeedbackRecord) -> None:
    wire = record_to_wire(kind, item)
    rebuilt_kind, rebuilt = record_from_wire(marshal.loads(marshal.dumps(wire)))
    assert rebuilt_kind == kind
    assert type(rebuilt) is type(item)
    assert rebuilt == item


def test_a_batch_of_mixed_records_is_one_marshal_blob() -> None:
    items = [(PREDICTION, predict_record()), (PREDICTION, generate_record()), (FEEDBACK, feedback_record(None))]
    blob = marshal.dumps([record_to_wire(kind, item) for kind, item in items])
    assert [record_from_wire(wire) for wire in marshal.loads(blob)] == items


def test_a_rating_of_zero_stays_a_rating() -> None:
    _, rebuilt = record_from_wire(record_to_wire(FEEDBACK, feedback_record(0.0)))
    assert isinstance(rebuilt, FeedbackRecord) and rebuilt.rating == 0.0


def test_numpy_numbers_travel_as_python_numbers() -> None:
    """marshal would write a numpy scalar as its raw bytes without complaint."""
    record = generate_record()
    record.latency_ms = np.float64(3.25)  # type: ignore[assignment]
    record.request.max_tokens = np.int64(8)  # type: ignore[union-attr]
    _, rebuilt = record_from_wire(marshal.loads(marshal.dumps(record_to_wire(PREDICTION, record))))
    assert isinstance(rebuilt, CompletedRequest)
    assert type(rebuilt.latency_ms) is float and rebuilt.latency_ms == 3.25
    assert isinstance(rebuilt.request, GenerateInput) and type(rebuilt.request.max_tokens) is int


@pytest.mark.parametrize("dtype", sorted(DTYPE_ITEMSIZE))
@pytest.mark.parametrize("capture", [0, 3, 256])
def test_trimmed_tensors_make_the_same_event(dtype: str, capture: int) -> None:
    """With capture_max_values, only the tensor bytes prediction_event reads cross the pipe."""
    rng = np.random.default_rng(7)
    big = TensorData(
        "big", dtype, (4, 100), rng.integers(0, 256, 400 * (DTYPE_ITEMSIZE[dtype] or 3), np.uint8).tobytes()
    )
    short = TensorData("short", dtype, (1, 30), b"\x01" * 10)  # a rejected request's short data
    record = predict_record()
    record.request = PredictInput(model="m", inputs=[big, short])
    assert record.result is not None
    record.result.outputs = [big]
    _, trimmed = record_from_wire(marshal.loads(marshal.dumps(record_to_wire(PREDICTION, record, capture))))
    assert isinstance(trimmed, CompletedRequest) and isinstance(trimmed.request, PredictInput)
    assert prediction_event(trimmed, capture) == prediction_event(record, capture)
    item_size = DTYPE_ITEMSIZE[dtype] or 0
    assert len(trimmed.request.inputs[0].data) == capture * item_size


def test_stats_have_the_emitters_keys() -> None:
    settings = EventSettings(enabled=True)
    assert list(EventProcess(settings).stats()) == list(EventEmitter(settings).stats())


def test_the_child_gets_the_settings_with_the_real_kafka_password() -> None:
    kafka = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="s3cr3t"
    )
    settings = EventSettings(enabled=True, kafka=kafka, linger_ms=5)
    rebuilt = EventSettings.model_validate_json(_child_env(settings)[_SETTINGS_ENV])
    assert rebuilt == settings
    assert rebuilt.kafka.sasl_password is not None and rebuilt.kafka.sasl_password.get_secret_value() == "s3cr3t"


@pytest.mark.parametrize(
    ("last_heard", "last_progress", "sent", "read", "stalled"),
    [
        (99.5, 50.0, 7, 7, 0.5),  # idle, heartbeat fresh: nothing pending, however long ago
        (99.5, 98.0, 8, 7, 2.0),  # reports (its heartbeat thread lives) but a frame stays unread
        (90.0, 99.0, 8, 8, 10.0),  # silent: stopped, or its reporter died
        (95.0, 80.0, 9, 7, 20.0),  # both: the longer counts
    ],
)
def test_a_child_looks_hung_when_silent_or_not_reading(
    last_heard: float, last_progress: float, sent: int, read: int, stalled: float
) -> None:
    assert stall_seconds(100.0, last_heard, last_progress, sent, read) == pytest.approx(stalled)
