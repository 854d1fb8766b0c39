"""Right to delete: remove one user's rows from every table that holds user data, prove it, audit it.

Rows are deleted by their random event ids, not by a unit_id predicate: ClickHouse keeps each
mutation's text (system.mutations, and files next to the data), which would otherwise keep the
very identifier being erased. Deletes are ALTER TABLE ... DELETE with mutations_sync=2: the
parts are rewritten before the call returns, so the data is physically gone (a lightweight
DELETE only masks rows until a merge). The audit row stores a keyed hash of the unit id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common import errors
from services.common.clickhouse import Client
from services.logger.pii import PiiPolicy, keyed_hash
from services.logger.queries import USER_DATA_TABLES

_CHUNK = 10_000  # ids per mutation: keeps each mutation's text bounded
_MUTATION_SETTINGS = {"mutations_sync": 2}


@dataclass(frozen=True)
class DeletionReport:
    audit_id: str
    subject_key: str
    requested_by: str
    reason: str
    requested_at: datetime
    completed_at: datetime
    rows_removed: dict[str, int]  # distinct rows (events) removed per table
    rows_remaining: dict[str, int]  # physical rows of the user left per table (0 when verified)

    @property
    def verified(self) -> bool:
        return all(count == 0 for count in self.rows_remaining.values())


def stored_unit_id(policy: PiiPolicy, unit_id: str) -> str:
    """The unit id as the logger stored it (hashed under a `hash` policy)."""
    stored = policy.apply("unit_id", unit_id)
    if policy.action("unit_id") == "redact" and stored != unit_id:
        raise errors.FailedPrecondition(
            "unit ids are stored redacted under the current PII policy: rows cannot be attributed to a user"
        )
    return stored


def subject_key(policy: PiiPolicy, unit_id: str) -> str:
    """Keyed hash of the stored unit id: what the audit and the consumer's tombstones hold."""
    return keyed_hash(stored_unit_id(policy, unit_id), policy.salt)


def _chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield list(ids[start : start + _CHUNK])


def _ids(client: Client, sql: str, unit: str) -> list[str]:
    return [row[0] for row in client.query(sql, parameters={"unit": unit}).result_rows]


def _count_by_ids(client: Client, table: str, column: str, ids: Sequence[str]) -> int:
    total = 0
    for chunk in _chunks(ids):
        result = client.query(
            f"SELECT count() FROM {table} WHERE {column} IN {{ids:Array(String)}}", parameters={"ids": chunk}
        )
        total += int(result.result_rows[0][0])
    return total


def delete_user(client: Client, unit_id: str, requested_by: str, reason: str, *, policy: PiiPolicy) -> DeletionReport:
    """Deletes every row of `unit_id` (predictions by unit; feedback by unit and by that user's
    prediction ids), verifies none remain, writes a privacy_audit row, and returns the report.

    The caller must keep writers out meanwhile (the logger holds its consumer's write lock).
    """
    if not unit_id:
        raise errors.InvalidArgument("unit_id is required")
    if not requested_by:
        raise errors.InvalidArgument("requested_by is required (who asked for the deletion)")
    if not reason:
        raise errors.InvalidArgument("reason is required (for the audit)")
    requested_at = datetime.now(UTC)
    unit = stored_unit_id(policy, unit_id)

    prediction_ids = _ids(client, "SELECT DISTINCT prediction_id FROM predictions WHERE unit_id = {unit:String}", unit)
    feedback_ids = sorted(
        set(_ids(client, "SELECT DISTINCT feedback_id FROM feedback WHERE unit_id = {unit:String}", unit))
        | {
            row[0]
            for chunk in _chunks(prediction_ids)
            for row in client.query(
                "SELECT DISTINCT feedback_id FROM feedback WHERE prediction_id IN {ids:Array(String)}",
                parameters={"ids": chunk},
            ).result_rows
        }
    )
    # Feedback first: if we stop half-way, no feedback is left pointing at deleted predictions.
    for table, key, ids in (
        ("feedback", "feedback_id", feedback_ids),
        ("predictions", "prediction_id", prediction_ids),
    ):
        for chunk in _chunks(ids):
            client.command(
                f"ALTER TABLE {table} DELETE WHERE {key} IN {{ids:Array(String)}}",
                parameters={"ids": chunk},
                settings=_MUTATION_SETTINGS,
            )

    remaining = {
        "predictions": int(
            client.query(
                "SELECT count() FROM predictions WHERE unit_id = {unit:String}", parameters={"unit": unit}
            ).result_rows[0][0]
        ),
        "feedback": int(
            client.query(
                "SELECT count() FROM feedback WHERE unit_id = {unit:String}", parameters={"unit": unit}
            ).result_rows[0][0]
        )
        + _count_by_ids(client, "feedback", "prediction_id", prediction_ids),
    }
    assert set(remaining) == set(USER_DATA_TABLES)
    report = DeletionReport(
        audit_id=str(uuid.uuid4()),
        subject_key=keyed_hash(unit, policy.salt),
        requested_by=requested_by,
        reason=reason,
        requested_at=requested_at,
        completed_at=datetime.now(UTC),
        rows_removed={"predictions": len(prediction_ids), "feedback": len(feedback_ids)},
        rows_remaining=remaining,
    )
    client.insert(
        "privacy_audit",
        [
            [
                report.audit_id,
                report.subject_key,
                report.requested_by,
                report.reason,
                report.requested_at,
                report.completed_at,
                report.rows_removed,
                report.rows_remaining,
                report.verified,
            ]
        ],
        column_names=[
            "audit_id",
            "subject_key",
            "requested_by",
            "reason",
            "requested_at",
            "completed_at",
            "rows_removed",
            "rows_remaining",
            "verified",
        ],
    )
    return report
