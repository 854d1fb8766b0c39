"""The logger process: owns the ClickHouse store, runs the Kafka consumer in a thread, serves
mlmesh.v1.Logger. With embedded ClickHouse (chdb locks its directory to one process) the drift /
analysis service is hosted here too and uses LoggerApp.client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from services.common.clickhouse import Client, make_client
from services.common.server import RunningServer, start_server
from services.logger import servicer
from services.logger.consumer import ConsumerStats, EventConsumer
from services.logger.ingest_schema import schema_file_for
from services.logger.migrate import migrate
from services.logger.pii import PiiPolicy
from services.logger.privacy import DeletionReport, delete_user, subject_key
from services.logger.readonly_sql import QueryResult, run_readonly
from services.logger.settings import LoggerSettings

log = logging.getLogger(__name__)


@dataclass
class LoggerApp:
    settings: LoggerSettings
    client: Client  # read-write store client: share it with co-hosted services (drift)
    readonly_client: Client  # its own session with readonly=2, for Query
    policy: PiiPolicy
    consumer: EventConsumer
    server: RunningServer | None = None
    owns_client: bool = True
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("the logger was started without its gRPC server")
        return self.server.address

    # ---- backend of the servicer (blocking; called in threads) ----------------------------

    def query(self, sql: str, max_rows: int) -> QueryResult:
        cap = self.settings.query_max_rows
        limit = cap if max_rows <= 0 else min(max_rows, cap)
        return run_readonly(self.readonly_client, sql, limit, self.settings.query_timeout_s)

    def delete_user(self, unit_id: str, requested_by: str, reason: str) -> DeletionReport:
        # Writes paused: no batch can slip the user's rows in between the delete and the
        # tombstone that keeps a later redelivery of older events out.
        with self.consumer.writes_paused():
            report = delete_user(self.client, unit_id, requested_by, reason, policy=self.policy)
            self.consumer.tombstones.add(subject_key(self.policy, unit_id), int(report.requested_at.timestamp() * 1000))
        log.info(
            "deleted user data: audit %s by %s, removed %s, verified=%s",
            report.audit_id,
            requested_by,
            report.rows_removed,
            report.verified,
        )
        return report

    def stats(self) -> tuple[ConsumerStats, bool]:
        return self.consumer.stats(), self.consumer.ready

    # ---- lifecycle -------------------------------------------------------------------------

    async def wait_consuming(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.consumer.wait_ready, timeout_s)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stops serving (drains calls), ends consuming after the batch in flight is stored and
        committed, then closes the store."""
        if self.server is not None:
            await self.server.stop()
        self.consumer.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                log.warning("consumer thread still busy after %.0f s; closing anyway", timeout_s)
        self.readonly_client.close()
        if self.owns_client:
            self.client.close()


async def start_logger(settings: LoggerSettings | None = None, *, client: Client | None = None) -> LoggerApp:
    """Migrates the store, starts the consumer thread (it creates the topics), serves gRPC.

    client: a store client to reuse (then not closed by stop()); by default one is opened from
    settings.clickhouse_dsn. Kafka being down does not stop the start: Query and DeleteUser
    work, and the consumer keeps retrying (Stats shows it).
    """
    settings = settings or LoggerSettings()
    owns_client = client is None
    store = client if client is not None else await asyncio.to_thread(make_client, settings.clickhouse_dsn)
    readonly_client: Client | None = None
    app: LoggerApp | None = None
    try:
        applied = await asyncio.to_thread(migrate, store, settings.retention)
        if applied:
            log.info("store migrated: %s", ", ".join(applied))
        readonly_client = await asyncio.to_thread(make_client, settings.clickhouse_dsn, readonly=True)
        policy = settings.pii_policy()
        consumer = EventConsumer(
            store,
            settings.kafka,
            settings.group_id,
            policy,
            batch_max_events=settings.batch_max_events,
            batch_max_wait_ms=settings.batch_max_wait_ms,
            consume_alerts=settings.consume_alerts,
            schema_file=await asyncio.to_thread(
                schema_file_for, settings.clickhouse_dsn, settings.clickhouse_ingest_schema_file
            ),
        )
        app = LoggerApp(settings, store, readonly_client, policy, consumer, owns_client=owns_client)
        app._thread = threading.Thread(target=consumer.run, name="mlmesh-logger-consumer", daemon=True)
        app._thread.start()
        started = time.monotonic()
        if not await app.wait_consuming(settings.kafka_startup_wait_s):
            log.warning(
                "kafka at %s not ready after %.0f s; serving queries, the consumer keeps retrying",
                settings.kafka.bootstrap_servers,
                time.monotonic() - started,
            )
        app.server = await start_server("logger", [servicer.registration(app)], settings)
    except BaseException:
        if app is not None:
            await app.stop()
        else:
            if readonly_client is not None:
                readonly_client.close()
            if owns_client:
                store.close()
        raise
    return app
