import struct

import numpy as np
import pytest

from services.common import errors
from services.common.domain import GenerateInput, ModelInfo, PredictInput, TensorData, TensorSpec
from services.gateway.settings import RequestLimits
from services.gateway.validation import validate_generate, validate_predict

MODEL = ModelInfo(
    name="tabular-classifier",
    version="1",
    kind="tabular",
    inputs=(TensorSpec("features", "FP32", (-1, 30)),),
    outputs=(TensorSpec("label", "INT64", (-1, 1)), TensorSpec("probabilities", "FP32", (-1, 2))),
    max_batch_size=256,
    ready=True,
)
LIMITS = RequestLimits(max_tensor_bytes=64 * 1024, max_prompt_chars=100, max_tokens=512, default_max_tokens=32)


def rows(n: int, width: int = 30, dtype: str = "float32") -> bytes:
    return np.zeros((n, width), dtype=dtype).tobytes()


def request(*tensors: TensorData, outputs: list[str] | None = None) -> PredictInput:
    return PredictInput(model="tabular-classifier", inputs=list(tensors), outputs=outputs or [])


def assert_invalid(match: str, fn, *args) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        fn(*args)


def test_valid_batch_passes() -> None:
    validate_predict(request(TensorData("features", "FP32", (4, 30), rows(4))), MODEL, LIMITS)


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (TensorData("features", "INT64", (1, 30), rows(1, dtype="int64")), r"dtype: expected FP32, got INT64"),
        (TensorData("features", "FLOAT", (1, 30), rows(1)), r"unknown dtype 'FLOAT'"),
        (TensorData("features", "FP32", (1, 29), rows(1, 29)), r"shape\[1\]: expected 30, got 29"),
        (TensorData("features", "FP32", (30,), rows(1)), r"expected 2 dimensions"),
        (TensorData("features", "FP32", (2, 30), rows(1)), r"needs 240 bytes, got 120"),
        (TensorData("features", "FP32", (257, 30), rows(257)), r"batch of 257 exceeds the model's maximum of 256"),
        (TensorData("features", "FP32", (0, 30), b""), r"batch must not be empty"),
        (TensorData("features", "FP32", (-1, 30), rows(1)), r"shape\[0\]"),
        (TensorData("pixels", "FP32", (1, 30), rows(1)), r"inputs\[0\].name: model 'tabular-classifier' has no input"),
    ],
)
def test_bad_tensors_are_rejected_naming_the_field(tensor: TensorData, match: str) -> None:
    assert_invalid(match, validate_predict, request(tensor), MODEL, LIMITS)


def test_payload_over_the_byte_limit_is_rejected_before_shape_math() -> None:
    big = TensorData("features", "FP32", (600, 30), rows(600))  # 72 000 bytes > 64 KiB
    limits = LIMITS.model_copy(update={"max_tensor_bytes": 65536})
    model = ModelInfo("m", "1", "tabular", inputs=MODEL.inputs, outputs=MODEL.outputs, max_batch_size=1000)
    with pytest.raises(errors.InvalidArgument, match=r"raw_data: 72000 bytes exceeds the limit of 65536"):
        validate_predict(PredictInput("m", [big]), model, limits)


def test_missing_and_duplicate_inputs() -> None:
    assert_invalid("at least one input tensor", validate_predict, request(), MODEL, LIMITS)
    t = TensorData("features", "FP32", (1, 30), rows(1))
    assert_invalid("given twice", validate_predict, request(t, t), MODEL, LIMITS)


def test_unknown_output_requested() -> None:
    t = TensorData("features", "FP32", (1, 30), rows(1))
    assert_invalid(
        r"outputs\[0\]: .* no output 'logits'", validate_predict, request(t, outputs=["logits"]), MODEL, LIMITS
    )
    validate_predict(request(t, outputs=["label"]), MODEL, LIMITS)


def test_bytes_tensors_are_checked_element_by_element() -> None:
    model = ModelInfo("m", "1", "tabular", inputs=(TensorSpec("text", "BYTES", (-1, 1)),), max_batch_size=8)
    good = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"cde"))
    validate_predict(PredictInput("m", [TensorData("text", "BYTES", (2, 1), good)]), model, LIMITS)
    with pytest.raises(errors.InvalidArgument, match="shape holds 3 elements, data has 2"):
        validate_predict(PredictInput("m", [TensorData("text", "BYTES", (3, 1), good)]), model, LIMITS)
    with pytest.raises(errors.InvalidArgument, match="overruns"):
        validate_predict(PredictInput("m", [TensorData("text", "BYTES", (1, 1), struct.pack("<I", 99))]), model, LIMITS)


def test_generate_defaults_and_limits() -> None:
    filled = validate_generate(GenerateInput(model="llm", prompt="hi"), LIMITS)
    assert filled.max_tokens == 32
    assert_invalid("prompt: must not be empty", validate_generate, GenerateInput("llm", "   "), LIMITS)
    assert_invalid(
        "prompt: 101 characters exceeds the limit of 100", validate_generate, GenerateInput("llm", "x" * 101), LIMITS
    )
    assert_invalid("max_tokens", validate_generate, GenerateInput("llm", "hi", max_tokens=513), LIMITS)
    assert_invalid("max_tokens", validate_generate, GenerateInput("llm", "hi", max_tokens=-1), LIMITS)
    assert_invalid("temperature", validate_generate, GenerateInput("llm", "hi", temperature=float("nan")), LIMITS)
    assert_invalid("top_p", validate_generate, GenerateInput("llm", "hi", top_p=1.5), LIMITS)


def test_feedback_needs_a_prediction_id_and_some_content() -> None:
    from services.common.domain import FeedbackInput
    from services.gateway.validation import validate_feedback

    validate_feedback(FeedbackInput(prediction_id="a" * 32, label="1"), LIMITS)
    validate_feedback(FeedbackInput(prediction_id="a" * 32, rating=0.0), LIMITS)
    assert_invalid("prediction_id: required", validate_feedback, FeedbackInput(prediction_id=""), LIMITS)
    assert_invalid("is not a prediction id", validate_feedback, FeedbackInput(prediction_id="x'; DROP", label="1"), LIMITS)
    assert_invalid("at least one of", validate_feedback, FeedbackInput(prediction_id="a" * 32), LIMITS)
    assert_invalid("finite", validate_feedback, FeedbackInput(prediction_id="a" * 32, rating=float("inf")), LIMITS)
