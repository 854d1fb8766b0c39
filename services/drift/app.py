"""The drift service process part: serves mlmesh.v1.Drift and runs the scheduled checks.

With embedded ClickHouse (chdb) only one process may open the store, so the drift service is
hosted in the logger's process and is given `LoggerApp.client`. It does not query through that
client: a chdb client serialises its calls behind one lock, and a drift query over millions of
rows would hold the logger's writer back for its whole duration. It opens its own session on
the same engine instead (what make_client does for the logger's read-only session), and closes
only that one. Given a ClickHouse server client it uses it as is (set MLMESH_DRIFT_CLICKHOUSE_DSN
to give drift its own connection there).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.common.clickhouse import Client, make_client
from services.common.server import RunningServer, start_server
from services.drift import servicer
from services.drift.alerts import DriftScheduler
from services.drift.service import DriftService
from services.drift.settings import DriftSettings

log = logging.getLogger(__name__)


def _own_session(client: Client | None, settings: DriftSettings) -> tuple[Client, bool]:
    """(the client drift queries with, whether drift owns and closes it)."""
    if settings.clickhouse_dsn:
        return make_client(settings.clickhouse_dsn), True
    if client is None:
        raise ValueError(
            "the drift service needs a store: host it with the logger (start_drift(settings, logger.client)) "
            "or set MLMESH_DRIFT_CLICKHOUSE_DSN"
        )
    path = getattr(client, "path", None)
    if type(client).__name__ == "ChdbClient" and isinstance(path, str):
        dsn = "chdb://memory" if path.startswith(":memory:") else f"chdb://{path}"
        return make_client(dsn), True  # same engine (same process), own handle and lock
    return client, False


@dataclass
class DriftApp:
    settings: DriftSettings
    service: DriftService
    scheduler: DriftScheduler
    server: RunningServer | None = None
    owns_client: bool = False

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("the drift service was started without its gRPC server")
        return self.server.address

    async def stop(self) -> None:
        """Stops serving (drains calls) and the scheduled checks, then closes its own session."""
        if self.server is not None:
            await self.server.stop()
        await self.scheduler.stop()
        if self.owns_client:
            self.service.client.close()


async def start_drift(
    settings: DriftSettings | None = None, client: Client | None = None, *, serve: bool = True
) -> DriftApp:
    """Creates the profiles table if needed, starts the scheduled checks (if configured), serves gRPC.

    client: the host's store client (LoggerApp.client); see the module docstring. serve=False
    skips the gRPC server (the domain object and the scheduler only).
    """
    settings = settings or DriftSettings()
    store_client, owns = await asyncio.to_thread(_own_session, client, settings)
    service = DriftService(store_client, settings)
    app = DriftApp(settings, service, DriftScheduler(service, settings), owns_client=owns)
    try:
        await asyncio.to_thread(service.ensure_schema)
        app.scheduler.start()
        if serve:
            app.server = await start_server("drift", [servicer.registration(service, app.scheduler)], settings)
    except BaseException:
        await app.stop()
        raise
    return app
