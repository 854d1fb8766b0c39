"""Request validation against the model's tensor contract. Errors name the offending field."""

from __future__ import annotations

import math
import struct

from services.common import errors
from services.common.domain import DTYPE_ITEMSIZE, FeedbackInput, GenerateInput, ModelInfo, PredictInput, TensorData
from services.gateway.settings import RequestLimits


def _bytes_element_count(raw: bytes, field: str) -> int:
    count, offset = 0, 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise errors.InvalidArgument(f"{field}: truncated BYTES element length at offset {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4 + length
        if offset > len(raw):
            raise errors.InvalidArgument(f"{field}: BYTES element overruns the buffer")
        count += 1
    return count


def _check_tensor(index: int, tensor: TensorData, model: ModelInfo, limits: RequestLimits) -> None:
    for spec in model.inputs:
        if spec.name == tensor.name:
            break
    else:
        names = ", ".join(s.name for s in model.inputs)
        raise errors.InvalidArgument(
            f"inputs[{index}].name: model '{model.name}' has no input '{tensor.name}' (inputs: {names})"
        )
    field = f"inputs[{index}] ('{tensor.name}')"
    if tensor.dtype not in DTYPE_ITEMSIZE:
        raise errors.InvalidArgument(f"{field}.dtype: unknown dtype '{tensor.dtype}'")
    if tensor.dtype != spec.dtype:
        raise errors.InvalidArgument(f"{field}.dtype: expected {spec.dtype}, got {tensor.dtype}")
    if len(tensor.shape) != len(spec.shape):
        raise errors.InvalidArgument(
            f"{field}.shape: expected {len(spec.shape)} dimensions {list(spec.shape)}, got {list(tensor.shape)}"
        )
    for axis, (got, want) in enumerate(zip(tensor.shape, spec.shape, strict=True)):
        if got < 0 or (want != -1 and got != want):
            raise errors.InvalidArgument(f"{field}.shape[{axis}]: expected {want if want != -1 else '>= 0'}, got {got}")
    if model.max_batch_size > 0 and tensor.shape and tensor.shape[0] > model.max_batch_size:
        raise errors.InvalidArgument(
            f"{field}.shape[0]: batch of {tensor.shape[0]} exceeds the model's maximum of {model.max_batch_size}"
        )
    if model.max_batch_size > 0 and tensor.shape and tensor.shape[0] == 0:
        raise errors.InvalidArgument(f"{field}.shape[0]: batch must not be empty")
    if len(tensor.data) > limits.max_tensor_bytes:
        raise errors.InvalidArgument(
            f"{field}.raw_data: {len(tensor.data)} bytes exceeds the limit of {limits.max_tensor_bytes}"
        )
    elements = math.prod(tensor.shape)
    itemsize = DTYPE_ITEMSIZE[tensor.dtype]
    if itemsize is None:
        found = _bytes_element_count(tensor.data, f"{field}.raw_data")
        if found != elements:
            raise errors.InvalidArgument(f"{field}.raw_data: shape holds {elements} elements, data has {found}")
    elif len(tensor.data) != elements * itemsize:
        raise errors.InvalidArgument(
            f"{field}.raw_data: shape {list(tensor.shape)} of {tensor.dtype} needs {elements * itemsize} bytes, "
            f"got {len(tensor.data)}"
        )


def validate_predict(request: PredictInput, model: ModelInfo, limits: RequestLimits) -> None:
    if not request.inputs:
        raise errors.InvalidArgument("inputs: at least one input tensor is required")
    seen: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        if tensor.name in seen:
            raise errors.InvalidArgument(f"inputs[{index}].name: input '{tensor.name}' given twice")
        seen.add(tensor.name)
        _check_tensor(index, tensor, model, limits)
    missing = [s.name for s in model.inputs if s.name not in seen]
    if missing:
        raise errors.InvalidArgument(f"inputs: missing required input(s) {', '.join(missing)}")
    batch_sizes = {t.shape[0] for t in request.inputs if t.shape} if model.max_batch_size > 0 else set()
    if len(batch_sizes) > 1:
        raise errors.InvalidArgument(f"inputs: tensors disagree on batch size {sorted(batch_sizes)}")
    known_outputs = {s.name for s in model.outputs}
    for index, name in enumerate(request.outputs):
        if name not in known_outputs:
            known = ", ".join(sorted(known_outputs))
            raise errors.InvalidArgument(
                f"outputs[{index}]: model '{model.name}' has no output '{name}' (outputs: {known})"
            )


def validate_generate(request: GenerateInput, limits: RequestLimits) -> GenerateInput:
    """Checks a generation request and returns it with server defaults filled in."""
    if not request.prompt.strip():
        raise errors.InvalidArgument("prompt: must not be empty")
    if len(request.prompt) > limits.max_prompt_chars:
        raise errors.InvalidArgument(
            f"prompt: {len(request.prompt)} characters exceeds the limit of {limits.max_prompt_chars}"
        )
    params = request
    if params.max_tokens < 0 or params.max_tokens > limits.max_tokens:
        raise errors.InvalidArgument(
            f"params.max_tokens: must be between 1 and {limits.max_tokens}, got {params.max_tokens}"
        )
    if not (0.0 <= params.temperature <= 2.0) or math.isnan(params.temperature):
        raise errors.InvalidArgument(f"params.temperature: must be in [0, 2], got {params.temperature}")
    if not (0.0 <= params.top_p <= 1.0) or math.isnan(params.top_p):
        raise errors.InvalidArgument(f"params.top_p: must be in [0, 1] (0 means 1), got {params.top_p}")
    if params.max_tokens == 0:
        request.max_tokens = limits.default_max_tokens
    return request


def validate_feedback(feedback: FeedbackInput, limits: RequestLimits) -> None:
    prediction_id = feedback.prediction_id
    if not prediction_id:
        raise errors.InvalidArgument("prediction_id: required (the id a Predict or Generate response carried)")
    if len(prediction_id) > 64 or not prediction_id.replace("-", "").isalnum():
        raise errors.InvalidArgument(f"prediction_id: '{prediction_id[:80]}' is not a prediction id")
    if not (feedback.label or feedback.outcome or feedback.text or feedback.rating is not None):
        raise errors.InvalidArgument("feedback: give at least one of label, rating, outcome or text")
    if feedback.rating is not None and not math.isfinite(feedback.rating):
        raise errors.InvalidArgument(f"rating: must be a finite number, got {feedback.rating}")
    if len(feedback.text) > limits.max_prompt_chars:
        raise errors.InvalidArgument(
            f"text: {len(feedback.text)} characters exceeds the limit of {limits.max_prompt_chars}"
        )
