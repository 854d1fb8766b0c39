"""A tiny migrator: migrations/NNN_name.sql applied in order, recorded in schema_migrations.

Idempotent: applied versions are skipped, and every statement is written to be re-runnable
(IF NOT EXISTS), so a crash between a statement and its record is harmless. Retention days are
template values (${predictions_days}); they are not part of a migration's checksum, and
apply_retention() moves an existing table's TTL when the settings change.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from string import Template

from services.common.clickhouse import Client
from services.logger.settings import RetentionSettings

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# (table, event-time column, retention field)
_TTL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("predictions", "started_at", "predictions_days"),
    ("feedback", "created_at", "feedback_days"),
    ("alerts", "created_at", "alerts_days"),
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def statements(self, retention: RetentionSettings) -> list[str]:
        sql = Template(self.template).substitute(retention.model_dump())
        # Statements end with ';' at the end of a line (a ClickHouse server takes one per request).
        lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
        return [part.strip() for part in re.split(r";\s*$", "\n".join(lines), flags=re.M) if part.strip()]


def load_migrations() -> list[Migration]:
    folder = resources.files("services.logger") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {folder}: {versions}")
    return found


def migrate(client: Client, retention: RetentionSettings) -> list[str]:
    """Applies the pending migrations in order; returns their names. Then syncs retention."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, checksum String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
    )
    applied = {
        row[0]: row[1]
        for row in client.query("SELECT version, any(checksum) FROM schema_migrations GROUP BY version").result_rows
    }
    done: list[str] = []
    for migration in load_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise RuntimeError(
                    f"migration {migration.version:03d}_{migration.name} changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        for statement in migration.statements(retention):
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
        )
        done.append(f"{migration.version:03d}_{migration.name}")
        log.info("applied migration %03d_%s", migration.version, migration.name)
    apply_retention(client, retention)
    return done


def apply_retention(client: Client, retention: RetentionSettings) -> dict[str, int]:
    """Sets each table's TTL to the configured days where it differs; returns the changes."""
    changed: dict[str, int] = {}
    rows = client.query(
        "SELECT name, engine_full FROM system.tables "
        "WHERE database = currentDatabase() AND name IN {names:Array(String)}",
        parameters={"names": [table for table, _, _ in _TTL_COLUMNS]},
    ).result_rows
    engines = dict(rows)
    for table, column, field in _TTL_COLUMNS:
        days = getattr(retention, field)
        current = re.search(rf"TTL {column} \+ toIntervalDay\((\d+)\)", engines.get(table, ""))
        if current is not None and int(current.group(1)) == days:
            continue
        # Rewrites existing parts' TTL info once (materialize_ttl_after_modify), then merges drop rows.
        client.command(f"ALTER TABLE {table} MODIFY TTL {column} + INTERVAL {days} DAY")
        changed[table] = days
        log.info("retention of %s set to %d days", table, days)
    return changed
