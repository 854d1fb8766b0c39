"""The server span of a call when no exporter records spans: trace ids still flow."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from services.common import telemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = [("authorization", "Bearer k"), ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01")]


def _span(metadata: list[tuple[str, str]] | None) -> Any:
    return telemetry.server_span(telemetry.tracer("test"), "/mlmesh.v1.Gateway/Predict", metadata)


def test_a_callers_traceparent_gives_the_trace_id_and_a_new_span_id() -> None:
    with _span(CALLER) as span:
        assert telemetry.current_trace_id() == TRACE_ID
        context = span.get_span_context()
        assert context.is_valid and format(context.span_id, "016x") != "00f067aa0ba902b7"
        outgoing = dict(telemetry.trace_metadata())["traceparent"]
        assert outgoing.startswith(f"00-{TRACE_ID}-{format(context.span_id, '016x')}-")
    assert telemetry.current_trace_id() == ""  # the context is restored after the call


def test_a_call_without_trace_context_starts_its_own_trace() -> None:
    with _span([("authorization", "Bearer k")]):
        first = telemetry.current_trace_id()
    with _span(None):
        second = telemetry.current_trace_id()
    assert len(first) == 32 and len(second) == 32 and first != second


def test_an_invalid_traceparent_is_ignored() -> None:
    with _span([("traceparent", "00-not-a-trace-01")]) as span:
        assert span.get_span_context().is_valid
        assert telemetry.current_trace_id() != ""
    assert not trace.get_current_span().get_span_context().is_valid
