"""Stream responses carry only error text: it must map to the status a unary call would get."""

from __future__ import annotations

import pytest

from services.common import errors
from services.router.triton import stream_error


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Request for unknown model: 'x' is not found", errors.NotFound),
        ("Request for unknown model: 'm' version 9 is not found", errors.NotFound),
        ("[request id: 1] unexpected shape for input 'features' for model 'm'", errors.InvalidArgument),
        ("[request id: 2] inference input 'f' data-type is 'FP64', but model 'm' expects 'FP32'", errors.InvalidArgument),
        ("[request id: 3] input byte size mismatch for input 'f' for model 'm'. Expected 120, got 7", errors.InvalidArgument),
        ("[request id: 4] inference request batch-size must be <= 256 for 'm'", errors.InvalidArgument),
        ("[request id: 5] expected 1 inputs but got 2 inputs for model 'm'", errors.InvalidArgument),
        ("Exceeds maximum queue size", errors.ResourceExhausted),
        ("injected fault (fault_error_rate=1.0)", errors.Internal),
        ("onnxruntime failed: Got invalid dimensions for input", errors.Internal),
    ],
)
def test_stream_error_text_maps_to_the_unary_status(message: str, expected: type[errors.MeshError]) -> None:
    error = stream_error(message, "m")
    assert type(error) is expected
    assert "'m'" in error.message


def test_overload_carries_a_retry_hint() -> None:
    assert stream_error("Exceeds maximum queue size", "m").retry_after_s == pytest.approx(0.1)
