"""Registry state in a relational database: SQLite by default, PostgreSQL by DSN.

SQLAlchemy Core keeps one schema and one set of queries for both. Calls are blocking; the
registry runs them off the event loop (it is the control plane, never on the request path).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common import errors
from services.registry import audit

metadata = sa.MetaData()

models_table = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

versions_table = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("stage", sa.String(20), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("artifact_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_files", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("lineage_json", sa.Text, nullable=False, default="{}"),
    sa.Column("tags_json", sa.Text, nullable=False, default="{}"),
    sa.Column("triton_model", sa.String(200), nullable=False, default=""),
)

aliases_table = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(100), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

audit_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("subject", sa.String(300), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("details_json", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

rollouts_table = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("started_at", sa.String(40), nullable=False),
    sa.Column("data_json", sa.Text, nullable=False),
)

counters_table = sa.Table(
    "registry_counters",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class VersionRecord:
    model: str
    version: int
    kind: str
    stage: str
    artifact_sha256: str
    artifact_bytes: int
    artifact_files: int
    created_at: str
    created_by: str
    description: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    triton_model: str = ""
    aliases: list[str] = field(default_factory=list)


def database_url(dsn: str) -> str:
    """Accepts plain postgresql:// DSNs and points them at psycopg 3."""
    if dsn.startswith("postgresql://") or dsn.startswith("postgres://"):
        return "postgresql+psycopg://" + dsn.split("://", 1)[1]
    return dsn


class RegistryStore:
    def __init__(self, dsn: str) -> None:
        url = database_url(dsn)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url, future=True)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        if not self.is_postgres:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        # Writers of the audit chain take turns until their transaction commits: SQLite
        # transactions run one at a time in this process (SQLite has one writer anyway); on
        # PostgreSQL a transaction-level advisory lock orders them across registry processes.
        self._sqlite_writer = threading.RLock()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        if self.is_postgres:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._sqlite_writer, self.engine.begin() as conn:
            yield conn

    # -- models and versions ---------------------------------------------------------------

    def model_kind(self, conn: Connection, model: str) -> str | None:
        row = conn.execute(sa.select(models_table.c.kind).where(models_table.c.name == model)).first()
        return row[0] if row else None

    def create_model(self, conn: Connection, model: str, kind: str) -> None:
        conn.execute(models_table.insert().values(name=model, kind=kind, created_at=utc_now()))

    def next_version(self, conn: Connection, model: str) -> int:
        latest = conn.execute(
            sa.select(sa.func.max(versions_table.c.version)).where(versions_table.c.model == model)
        ).scalar()
        return (latest or 0) + 1

    def insert_version(self, conn: Connection, record: VersionRecord) -> None:
        conn.execute(
            versions_table.insert().values(
                model=record.model,
                version=record.version,
                stage=record.stage,
                artifact_sha256=record.artifact_sha256,
                artifact_bytes=record.artifact_bytes,
                artifact_files=record.artifact_files,
                created_at=record.created_at,
                created_by=record.created_by,
                description=record.description,
                lineage_json=json.dumps(record.lineage, sort_keys=True),
                tags_json=json.dumps(record.tags, sort_keys=True),
                triton_model=record.triton_model,
            )
        )

    def versions(self, conn: Connection, model: str | None = None) -> list[VersionRecord]:
        query = (
            sa.select(versions_table, models_table.c.kind)
            .join(models_table, models_table.c.name == versions_table.c.model)
            .order_by(versions_table.c.model, versions_table.c.version)
        )
        if model:
            query = query.where(versions_table.c.model == model)
        aliases: dict[tuple[str, int], list[str]] = {}
        alias_query = sa.select(aliases_table).order_by(aliases_table.c.alias)
        for row in conn.execute(alias_query if not model else alias_query.where(aliases_table.c.model == model)):
            aliases.setdefault((row.model, row.version), []).append(row.alias)
        return [
            VersionRecord(
                model=row.model,
                version=row.version,
                kind=row.kind,
                stage=row.stage,
                artifact_sha256=row.artifact_sha256,
                artifact_bytes=row.artifact_bytes,
                artifact_files=row.artifact_files,
                created_at=row.created_at,
                created_by=row.created_by,
                description=row.description,
                lineage=json.loads(row.lineage_json),
                tags=json.loads(row.tags_json),
                triton_model=row.triton_model,
                aliases=aliases.get((row.model, row.version), []),
            )
            for row in conn.execute(query)
        ]

    def version(self, conn: Connection, model: str, version: int) -> VersionRecord:
        for record in self.versions(conn, model):
            if record.version == version:
                return record
        if self.model_kind(conn, model) is None:
            raise errors.NotFound(f"model: unknown model '{model}'")
        raise errors.NotFound(f"version: model '{model}' has no version {version}")

    def set_stage(self, conn: Connection, model: str, version: int, stage: str) -> None:
        conn.execute(
            versions_table.update()
            .where(versions_table.c.model == model, versions_table.c.version == version)
            .values(stage=stage)
        )

    def set_triton_model(self, conn: Connection, model: str, version: int, triton_model: str) -> None:
        conn.execute(
            versions_table.update()
            .where(versions_table.c.model == model, versions_table.c.version == version)
            .values(triton_model=triton_model)
        )

    def set_alias(self, conn: Connection, model: str, alias: str, version: int) -> None:
        conn.execute(aliases_table.delete().where(aliases_table.c.model == model, aliases_table.c.alias == alias))
        conn.execute(aliases_table.insert().values(model=model, alias=alias, version=version))

    def alias_version(self, conn: Connection, model: str, alias: str) -> int | None:
        row = conn.execute(
            sa.select(aliases_table.c.version).where(aliases_table.c.model == model, aliases_table.c.alias == alias)
        ).first()
        return row[0] if row else None

    # -- counters (routing table version) ----------------------------------------------------

    def bump_counter(self, conn: Connection, name: str) -> int:
        current = conn.execute(sa.select(counters_table.c.value).where(counters_table.c.name == name)).scalar()
        if current is None:
            conn.execute(counters_table.insert().values(name=name, value=1))
            return 1
        conn.execute(counters_table.update().where(counters_table.c.name == name).values(value=current + 1))
        return current + 1

    def counter(self, conn: Connection, name: str) -> int:
        return conn.execute(sa.select(counters_table.c.value).where(counters_table.c.name == name)).scalar() or 0

    # -- rollouts ------------------------------------------------------------------------------

    def save_rollout(self, conn: Connection, rollout_id: str, model: str, state: str, started_at: str,
                     data: dict[str, Any]) -> None:
        payload = json.dumps(data, sort_keys=True)
        updated = conn.execute(
            rollouts_table.update().where(rollouts_table.c.id == rollout_id).values(state=state, data_json=payload)
        )
        if updated.rowcount == 0:
            conn.execute(
                rollouts_table.insert().values(
                    id=rollout_id, model=model, state=state, started_at=started_at, data_json=payload
                )
            )

    def rollouts(self, conn: Connection, model: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(rollouts_table.c.data_json).order_by(rollouts_table.c.started_at)
        if model:
            query = query.where(rollouts_table.c.model == model)
        return [json.loads(row[0]) for row in conn.execute(query)]

    # -- audit -------------------------------------------------------------------------------

    def append_audit(
        self, conn: Connection, actor: str, action: str, subject: str, reason: str, details: dict[str, Any]
    ) -> audit.AuditEntry:
        if self.is_postgres:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7242011)"))
        last = conn.execute(
            sa.select(audit_table.c.seq, audit_table.c.hash).order_by(audit_table.c.seq.desc()).limit(1)
        ).first()
        seq = (last.seq + 1) if last else 1
        entry = audit.seal(
            seq=seq,
            at=utc_now(),
            actor=actor,
            action=action,
            subject=subject,
            reason=reason,
            details_json=json.dumps(details, sort_keys=True, default=str),
            prev_hash=last.hash if last else audit.GENESIS_HASH,
        )
        conn.execute(audit_table.insert().values(**entry.as_row()))
        return entry

    def audit_entries(self, conn: Connection, subject: str = "", limit: int | None = None) -> list[audit.AuditEntry]:
        query = sa.select(audit_table).order_by(audit_table.c.seq)
        if subject:
            query = query.where(audit_table.c.subject == subject)
        rows = [audit.AuditEntry(**row._asdict()) for row in conn.execute(query)]
        return rows[-limit:] if limit else rows


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
