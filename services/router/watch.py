"""The router's side of the control plane: routing tables pushed by the registry, metrics reported.

- At start, the last table received (cached on disk as JSON) is applied, so a router restarted
  while the registry is down serves what it served before.
- WatchRoutes is a server stream: each table received is applied (RouterCore.apply_table) and
  written to the cache atomically (temp file + os.replace). When the stream breaks or the
  registry is down, it reconnects with capped exponential backoff, forever; serving goes on
  from the last table meanwhile. Nothing here runs per request.
- Every report_interval_s, ReportRouterMetrics sends the table version, the cumulative
  counters and the uptime (failures are logged at debug and otherwise ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import grpc

from services.common.api import registry_pb2, registry_pb2_grpc, routing_pb2
from services.common.channels import internal_channel
from services.common.routing import RouteTable, table_from_dict, table_from_proto, table_to_dict
from services.router.core import RouterCore

log = logging.getLogger(__name__)


def load_cached_table(path: Path) -> RouteTable | None:
    """The cached table, or None when there is none or it cannot be read (logged)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the routing-table cache %s: %s", path, exc)
        return None
    try:
        return table_from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a corrupt routing-table cache %s: %s", path, exc)
        return None


def write_cached_table(path: Path, table: RouteTable) -> None:
    """Writes the table so that a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with partial.open("w") as handle:
        json.dump(table_to_dict(table), handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


class RegistryWatcher:
    def __init__(
        self,
        address: str,
        router_id: str,
        core: RouterCore,
        cache_path: Path | None = None,
        report_interval_s: float = 1.0,
        *,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.address = address
        self.router_id = router_id
        self.core = core
        self.cache_path = cache_path
        self.report_interval_s = report_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # Observable state (for health, logs and tests).
        self.connected = False
        self.connect_attempts = 0
        self.tables_received = 0
        self.reports_sent = 0
        self.last_error = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryStub | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Applies the cached table (if any), then watches and reports in the background."""
        if self.cache_path is not None:
            cached = load_cached_table(self.cache_path)
            if cached is not None:
                log.info("serving the cached routing table v%d from %s", cached.version, self.cache_path)
                await self.core.apply_table(cached)
        self._channel = internal_channel(self.address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_forever(), name="registry-watch"),
            loop.create_task(self._report_forever(), name="registry-report"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _watch_forever(self) -> None:
        assert self._stub is not None
        backoff = self.backoff_initial_s
        while True:
            self.connect_attempts += 1
            call = self._stub.WatchRoutes(
                registry_pb2.WatchRoutesRequest(router_id=self.router_id, known_version=self.core.table_version)
            )
            try:
                async for message in call:
                    if not self.connected:
                        log.info("watching routing tables at %s", self.address)
                    self.connected = True
                    backoff = self.backoff_initial_s
                    await self._receive(message)
                self.last_error = "the registry ended the watch stream"
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:  # a bad table must not end the watch
                log.exception("routing table from %s could not be applied", self.address)
                self.last_error = repr(exc)
                call.cancel()
            if self.connected:
                log.warning(
                    "routing-table watch at %s interrupted (%s); serving the last table", self.address, self.last_error
                )
            else:
                log.debug(
                    "registry at %s not reachable (%s); retrying in %.1fs", self.address, self.last_error, backoff
                )
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _receive(self, message: routing_pb2.RoutingTable) -> None:
        table = table_from_proto(message)
        self.tables_received += 1
        if await self.core.apply_table(table) and self.cache_path is not None:
            try:
                await asyncio.to_thread(write_cached_table, self.cache_path, table)
            except OSError as exc:
                log.warning("cannot write the routing-table cache %s: %s", self.cache_path, exc)

    def report(self) -> routing_pb2.RouterMetricsReport:
        return routing_pb2.RouterMetricsReport(
            router_id=self.router_id,
            table_version=self.core.table_version,
            counters=self.core.metrics.snapshot(),
            uptime_s=time.monotonic() - self.core.started_at,
        )

    async def _report_forever(self) -> None:
        assert self._stub is not None
        while True:
            await asyncio.sleep(self.report_interval_s)
            try:
                await self._stub.ReportRouterMetrics(self.report(), timeout=max(self.report_interval_s, 1.0))
                self.reports_sent += 1
            except grpc.aio.AioRpcError as exc:
                log.debug("metrics report to %s failed: %s", self.address, exc.code().name)
            except Exception:  # a bug here must not stop the reports (nor serving)
                log.exception("metrics report to %s failed", self.address)
