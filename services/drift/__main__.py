"""`python -m services.drift`: the drift service alone, against MLMESH_DRIFT_CLICKHOUSE_DSN.

With embedded ClickHouse (chdb) the store belongs to the logger's process: host drift there
instead (the mesh does, with the logger).
"""

from __future__ import annotations

import asyncio
import logging

from services.common.server import wait_for_shutdown_signal
from services.common.telemetry import setup_logging
from services.drift.app import start_drift
from services.drift.settings import DriftSettings

log = logging.getLogger("services.drift")


async def serve(settings: DriftSettings) -> None:
    app = await start_drift(settings)
    try:
        await wait_for_shutdown_signal()
        log.info("shutting down: draining in-flight analyses")
    finally:
        await app.stop()


def main() -> None:
    settings = DriftSettings()
    setup_logging(settings.log_level, settings.log_format)
    if not settings.clickhouse_dsn:
        raise SystemExit(
            "set MLMESH_DRIFT_CLICKHOUSE_DSN (e.g. http://localhost:8123), or run drift with the logger "
            "(MLMESH_SERVICES=logger,drift) when ClickHouse is embedded"
        )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
