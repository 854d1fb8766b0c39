"""Process composition: host any set of services in this process, chosen by configuration.

When the gateway and the router share a process, the gateway calls the router's domain object
directly (no loopback gRPC hop); the router still serves its own gRPC API for other gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import dataclass, field

from services.common.domain import GenerationUsage, PredictResult
from services.common.server import RunningServer, start_server, wait_for_shutdown_signal
from services.common.settings import TelemetrySettings
from services.common.telemetry import setup_logging, setup_telemetry
from services.drift.app import DriftApp, start_drift
from services.drift.settings import DriftSettings
from services.gateway import servicer as gateway_servicer
from services.gateway.core import Gateway, RouterPort
from services.gateway.event_process import EventProcess
from services.gateway.events import EventEmitter
from services.gateway.hooks import CompletedRequest, GatewayHook
from services.gateway.keys import Authenticator, KeyStore
from services.gateway.ratelimit import TenantRateLimiter
from services.gateway.settings import GatewaySettings
from services.logger.app import LoggerApp, start_logger
from services.logger.settings import LoggerSettings
from services.registry.app import RegistryApp, start_registry
from services.registry.settings import RegistrySettings
from services.router import servicer as router_servicer
from services.router.client import GrpcRouterClient
from services.router.core import RouterCore
from services.router.settings import RouterSettings
from services.router.shadow import ShadowResult
from services.router.triton import TritonBackend
from services.router.watch import RegistryWatcher

log = logging.getLogger(__name__)


class ShadowEvents:
    """Publishes the router's shadow results through the gateway's emitter.

    A shadow event gets its own prediction id, `<copied prediction id>~shadow-<variant>`: the
    stored predictions are deduplicated by prediction id, and the real row must survive.
    """

    def __init__(self, emitter: GatewayHook) -> None:
        self.emitter = emitter

    def on_shadow_result(self, result: ShadowResult) -> None:
        usage = None
        if result.rpc == "Generate":
            usage = GenerationUsage(result.input_tokens, result.output_tokens, 0.0, result.latency_ms)
        self.emitter.on_complete(
            CompletedRequest(
                prediction_id=f"{result.prediction_id}~shadow-{result.served_by.variant}",
                tenant=result.tenant,
                rpc=result.rpc,
                request=result.request,
                served_by=result.served_by,
                status=result.status,
                error=result.error.message if result.error else "",
                started_at_unix=result.started_at_unix,
                latency_ms=result.latency_ms,
                trace_id="",
                result=PredictResult(result.prediction_id, result.served_by, result.outputs)
                if result.rpc == "Predict" and result.error is None
                else None,
                completion_text=result.completion_text,
                finish_reason=result.finish_reason,
                usage=usage,
                extra={"shadow": "true"},
            )
        )


KNOWN_SERVICES = ("gateway", "router", "logger", "drift", "registry")


@dataclass
class Mesh:
    servers: dict[str, RunningServer] = field(default_factory=dict)
    router: RouterCore | None = None
    gateway: Gateway | None = None
    emitter: EventEmitter | EventProcess | None = None
    logger: LoggerApp | None = None
    registry: RegistryApp | None = None
    drift: DriftApp | None = None
    _closers: list = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def address(self, service: str) -> str:
        return self.servers[service].address

    async def stop(self) -> None:
        """Gateway first (drains client calls), then the router, then background work."""
        for name in ("gateway", "router"):  # the registry's server stops with its app, below
            if name in self.servers:
                await self.servers[name].stop()
        if self.drift is not None:
            await self.drift.stop()
        if self.logger is not None:
            await self.logger.stop()  # stores and commits its batch in flight
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in self._closers:
            await close()
        if self.registry is not None:  # last: routers in this process stop watching it first
            await self.registry.stop()


async def start_mesh(
    services: set[str] | frozenset[str],
    gateway_settings: GatewaySettings | None = None,
    router_settings: RouterSettings | None = None,
    registry_settings: RegistrySettings | None = None,
) -> Mesh:
    unknown = set(services) - set(KNOWN_SERVICES)
    if unknown or not services:
        raise ValueError(f"services must be a non-empty subset of {KNOWN_SERVICES}, got {sorted(services)}")
    setup_telemetry("mlmesh-" + "-".join(sorted(services)), TelemetrySettings())
    mesh = Mesh()
    try:
        if "logger" in services:
            # It owns the ClickHouse store: with embedded chdb, analysis services join this process.
            mesh.logger = await start_logger(LoggerSettings())
        if "drift" in services:
            drift_settings = DriftSettings()
            if mesh.logger is None and not drift_settings.clickhouse_dsn:
                raise ValueError(
                    "drift needs the logger in its process (embedded ClickHouse) or MLMESH_DRIFT_CLICKHOUSE_DSN"
                )
            mesh.drift = await start_drift(drift_settings, mesh.logger.client if mesh.logger else None)
            mesh.servers["drift"] = mesh.drift.server
        if "registry" in services:
            settings_reg = registry_settings or RegistrySettings()
            if mesh.drift is not None and not settings_reg.analysis_address:
                settings_reg = settings_reg.model_copy(update={"analysis_address": mesh.drift.address})
            mesh.registry = await start_registry(settings_reg)
            assert mesh.registry.server is not None
            mesh.servers["registry"] = mesh.registry.server
        if "router" in services:
            settings = router_settings or RouterSettings()
            if mesh.registry is not None and not settings.registry_address:
                # A co-hosted router follows the registry beside it (same watch API as remote ones).
                settings = settings.model_copy(update={"registry_address": mesh.registry.address})
            backend = TritonBackend(settings.triton_url, settings.triton_predict_stream)
            mesh.router = RouterCore(
                backend,
                settings.static_table(),
                settings.default_timeout_s,
                settings.batch_max_in_flight,
                breaker=settings.breaker.config(),
                shadow_max_in_flight=settings.shadow_max_in_flight,
                batch_gather_max_s=settings.batch_gather_max_us / 1e6,
            )
            await mesh.router.refresh_model_info()
            mesh._closers.append(mesh.router.close)
            if settings.registry_address:
                # Serves the cached table (if any) at once, then follows the registry's pushes.
                watcher = RegistryWatcher(
                    settings.registry_address,
                    settings.router_id,
                    mesh.router,
                    settings.table_cache_path,
                    settings.metrics_report_interval_s,
                )
                mesh._closers.insert(mesh._closers.index(mesh.router.close), watcher.stop)  # stops first
                await watcher.start()
            mesh._tasks.append(
                asyncio.create_task(mesh.router.keep_model_info_fresh(settings.model_refresh_interval_s))
            )
            mesh.servers["router"] = await start_server("router", [router_servicer.registration(mesh.router)], settings)
        if "gateway" in services:
            settings_gw = gateway_settings or GatewaySettings()
            router: RouterPort
            if mesh.router is not None and not settings_gw.router_address:
                router = mesh.router
            elif settings_gw.router_address:
                client = GrpcRouterClient(settings_gw.router_address)
                mesh._closers.append(client.close)
                router = client
            else:
                raise ValueError("gateway without a co-hosted router needs MLMESH_GATEWAY_ROUTER_ADDRESS")
            auth = Authenticator(KeyStore(settings_gw.keys_db), settings_gw.key_cache_ttl_s)
            hooks: list[GatewayHook] = []
            if settings_gw.events.enabled:
                events = settings_gw.events
                emitter = EventProcess(events) if events.out_of_process else EventEmitter(events)
                await asyncio.to_thread(emitter.start)  # a child process reports ready within ~1 s
                mesh.emitter = emitter
                hooks.append(emitter)
                if mesh.router is not None:  # shadow results become events too, marked as shadow
                    mesh.router.observer = ShadowEvents(emitter)
                mesh._closers.append(lambda: asyncio.to_thread(emitter.close))
            mesh.gateway = Gateway(router, auth, TenantRateLimiter(), settings_gw, hooks)
            mesh._tasks.append(
                asyncio.create_task(mesh.gateway.keep_models_fresh(settings_gw.model_refresh_interval_s))
            )
            mesh.servers["gateway"] = await start_server(
                "gateway", [gateway_servicer.registration(mesh.gateway)], settings_gw
            )
    except BaseException:
        await mesh.stop()
        raise
    return mesh


def freeze_startup_heap() -> None:
    """For a serving process, once its mesh is up: what exists after start-up lives as long as
    the process, so keep it out of the collector's full passes (about 50 ms each over this heap,
    a request-latency spike every time). Not in start_mesh: test processes start many meshes."""
    gc.freeze()


def services_from_env(default: str) -> set[str]:
    return {s.strip() for s in os.environ.get("MLMESH_SERVICES", default).split(",") if s.strip()}


async def serve(services: set[str]) -> None:
    mesh = await start_mesh(services)
    freeze_startup_heap()
    try:
        await wait_for_shutdown_signal()
        log.info("shutting down: draining in-flight requests")
    finally:
        await mesh.stop()


def install_event_loop() -> None:
    """uvloop when available and not disabled (MLMESH_EVENT_LOOP=asyncio): less CPU per call."""
    if os.environ.get("MLMESH_EVENT_LOOP", "uvloop") != "uvloop":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(default_services: str = "gateway,router") -> None:
    setup_logging(os.environ.get("MLMESH_LOG_LEVEL", "INFO"), os.environ.get("MLMESH_LOG_FORMAT", "text"))
    install_event_loop()
    asyncio.run(serve(services_from_env(default_services)))


if __name__ == "__main__":
    main()
