"""`python -m services.logger`: the logger alone (configuration from MLMESH_LOGGER_* variables)."""

from __future__ import annotations

import asyncio
import logging

from services.common.server import wait_for_shutdown_signal
from services.common.telemetry import setup_logging
from services.logger.app import start_logger
from services.logger.settings import LoggerSettings

log = logging.getLogger("services.logger")


async def serve(settings: LoggerSettings) -> None:
    app = await start_logger(settings)
    try:
        await wait_for_shutdown_signal()
        log.info("shutting down: finishing the batch in flight")
    finally:
        await app.stop()


def main() -> None:
    settings = LoggerSettings()
    setup_logging(settings.log_level, settings.log_format)
    # kafka-python logs every connection, fetch reset and rebalance at INFO.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
