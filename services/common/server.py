"""The one gRPC server bootstrap every service uses.

It adds health checking, reflection, a span per call with W3C context taken from metadata, the
mapping of domain errors (services.common.errors) to gRPC statuses, and graceful shutdown that
reports NOT_SERVING, then drains in-flight calls for the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from services.common import errors, telemetry
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

_STATUS_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
_ERROR_CLASSES: dict[grpc.StatusCode, type[errors.MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}
RETRY_AFTER_KEY = "retry-after-ms"


def status_code_of(error: errors.MeshError) -> grpc.StatusCode:
    return _STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> errors.MeshError:
    """Turns a failed downstream call into the domain error to re-raise (keeps code and message)."""
    retry_after = None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            retry_after = int(value) / 1000
    cls = _ERROR_CLASSES.get(exc.code(), errors.Internal)
    return cls(f"{what}: {exc.details()}", retry_after_s=retry_after)


async def _abort(context: grpc.aio.ServicerContext, error: errors.MeshError) -> None:
    if error.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(1, round(error.retry_after_s * 1000)))),))
    await context.abort(status_code_of(error), error.message)


async def _fail(context: grpc.aio.ServicerContext, span: Any, method: str, error: Exception) -> None:
    """Ends a failed call: a domain error with its status, anything else as INTERNAL (logged)."""
    if isinstance(error, errors.MeshError):
        span.set_attribute("rpc.grpc.status_code", status_code_of(error).value[0])
        await _abort(context, error)
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


def _wrap_handler(tracer: trace.Tracer, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A span per call and the one place where domain errors become statuses."""
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with telemetry.server_span(tracer, method, context.invocation_metadata()) as span:
                try:
                    return await behavior(request, context)
                except Exception as error:  # not CancelledError (a BaseException): it propagates
                    await _fail(context, span, method, error)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with telemetry.server_span(tracer, method, context.invocation_metadata()) as span:
                try:
                    async for item in stream_behavior(request, context):
                        yield item
                except Exception as error:
                    await _fail(context, span, method, error)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped once, on first use."""

    def __init__(self, inner: grpc.GenericRpcHandler, tracer: trace.Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # not cached: clients choose method names, the cache must stay bounded
            wrapped = self._wrapped[method] = _wrap_handler(self._tracer, method, handler)
        return wrapped


class _WrappingServer:
    """What the generated add_*_to_server functions are given: each method handler is wrapped
    once, when it is registered, instead of a server interceptor running on every call."""

    def __init__(self, server: grpc.aio.Server, tracer: trace.Tracer) -> None:
        self._server = server
        self._tracer = tracer

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGenericHandler(h, self._tracer) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: _wrap_handler(self._tracer, f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)


@dataclass(frozen=True)
class ServiceRegistration:
    """A servicer to host: its full proto name and the generated add_*_to_server function."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    grace_period_s: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers move away), then drain in-flight calls."""
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_period_s)


async def start_server(label: str, services: Sequence[ServiceRegistration], settings: ServerSettings) -> RunningServer:
    telemetry.setup_telemetry(label)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.full_name for s in services)
    wrapping = _WrappingServer(server, telemetry.tracer(label))
    for service in services:
        service.add_to_server(wrapping)  # type: ignore[arg-type]
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"{label}: cannot bind {settings.host}:{settings.port}")
    await server.start()
    for name in (*names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d (%s)", label, settings.host, port, ", ".join(names))
    return RunningServer(server, port, health_servicer, names, settings.grace_period_s)


async def wait_for_shutdown_signal() -> None:
    """Returns on the first SIGINT or SIGTERM. While the caller drains, a repeated SIGTERM is
    ignored (orchestrators escalate with SIGKILL) and a second Ctrl-C exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
        elif signum == signal.SIGINT:
            log.warning("second interrupt: exiting without draining")
            os._exit(130)
        else:
            log.info("already shutting down; draining in-flight requests")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
