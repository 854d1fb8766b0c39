"""Reference profiles, stored in ClickHouse next to the events (table `drift_profiles`).

One row per profile: the statistics core's ReferenceProfile as JSON (bin edges, counts and a
quantile sketch per feature; no row of the reference data beyond the sketch), with the model it
belongs to. The table holds no user identifiers, so right-to-delete does not concern it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common.clickhouse import Client
from services.drift.statistics import ReferenceProfile

DDL = """
CREATE TABLE IF NOT EXISTS drift_profiles
(
    profile_id String,
    model LowCardinality(String),
    model_version LowCardinality(String),
    created_at DateTime64(3, 'UTC'),
    source LowCardinality(String),
    window_start Nullable(DateTime64(3, 'UTC')),
    window_end Nullable(DateTime64(3, 'UTC')),
    rows UInt64,
    description String,
    profile String
)
ENGINE = ReplacingMergeTree
ORDER BY profile_id
"""


@dataclass(frozen=True)
class StoredProfile:
    profile_id: str
    model: str
    model_version: str
    created_at: datetime
    source: str  # "window" or "rows"
    window_start: datetime | None
    window_end: datetime | None
    rows: int
    description: str
    profile: ReferenceProfile


def ensure_schema(client: Client) -> None:
    client.command(DDL)


def save(
    client: Client,
    profile: ReferenceProfile,
    *,
    model: str,
    model_version: str,
    source: str,
    rows: int,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    description: str = "",
) -> StoredProfile:
    stored = StoredProfile(
        profile_id=str(uuid.uuid4()),
        model=model,
        model_version=model_version,
        created_at=datetime.now(UTC),
        source=source,
        window_start=window_start,
        window_end=window_end,
        rows=rows,
        description=description,
        profile=profile,
    )
    client.insert(
        "drift_profiles",
        [
            [
                stored.profile_id,
                model,
                model_version,
                stored.created_at,
                source,
                window_start,
                window_end,
                rows,
                description,
                profile.to_json(),
            ]
        ],
        column_names=[
            "profile_id",
            "model",
            "model_version",
            "created_at",
            "source",
            "window_start",
            "window_end",
            "rows",
            "description",
            "profile",
        ],
    )
    return stored


_COLUMNS = "profile_id, model, model_version, created_at, source, window_start, window_end, rows, description, profile"


def _row(row: tuple) -> StoredProfile:
    *head, text = row
    return StoredProfile(*head[:7], int(head[7]), head[8], ReferenceProfile.from_json(text))


def get(client: Client, profile_id: str) -> StoredProfile | None:
    rows = client.query(
        f"SELECT {_COLUMNS} FROM drift_profiles FINAL WHERE profile_id = {{id:String}}",
        parameters={"id": profile_id},
    ).result_rows
    return _row(rows[0]) if rows else None


def latest(client: Client, model: str, model_version: str = "") -> StoredProfile | None:
    """The newest profile of the model; of that version when given (else any version's)."""
    where = "model = {model:String}" + (" AND model_version = {version:String}" if model_version else "")
    rows = client.query(
        f"SELECT {_COLUMNS} FROM drift_profiles FINAL WHERE {where} ORDER BY created_at DESC LIMIT 1",
        parameters={"model": model, "version": model_version},
    ).result_rows
    return _row(rows[0]) if rows else None
