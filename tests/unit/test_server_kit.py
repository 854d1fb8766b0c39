"""The server kit's handler wrapping: known methods wrapped once, unknown ones never remembered."""

from __future__ import annotations

import grpc

from services.common import telemetry
from services.common.server import _WrappedGenericHandler


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _echo(request: bytes, context: object) -> bytes:
    return request


def test_known_methods_are_wrapped_once_and_unknown_ones_are_not_cached() -> None:
    inner = grpc.method_handlers_generic_handler("t.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_echo)})
    wrapped = _WrappedGenericHandler(inner, telemetry.tracer("test"))
    first = wrapped.service(_Details("/t.Echo/Say"))
    assert first is not None and first.unary_unary is not _echo  # the kit's wrapper, not the raw handler
    assert wrapped.service(_Details("/t.Echo/Say")) is first
    for index in range(1000):  # a client probing random method names must not grow memory
        assert wrapped.service(_Details(f"/t.Echo/Nope{index}")) is None
    assert len(wrapped._wrapped) == 1
