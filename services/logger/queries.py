"""The canonical queries over the event tables: duplicate-free before merges.

Rows are keyed by their event id in ReplacingMergeTree tables, and a redelivered event writes a
second row until a background merge collapses them. Every count or join the analysis relies on
reads with FINAL (merge-on-read), so it is exact at any moment. Use these, or copy the pattern:
never `count()` over a bare table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.clickhouse import Client

# Tables that hold user data, with the column naming the user (right-to-delete covers them all).
USER_DATA_TABLES: tuple[str, ...] = ("predictions", "feedback")


def _where(filters: dict[str, tuple[str, Any]]) -> tuple[str, dict[str, Any]]:
    """filters: param name -> (condition using {name:Type}, value); filters with value None are off."""
    active = {name: (cond, value) for name, (cond, value) in filters.items() if value is not None}
    where = (" WHERE " + " AND ".join(cond for cond, _ in active.values())) if active else ""
    return where, {name: value for name, (_, value) in active.items()}


def count_predictions(
    client: Client,
    *,
    model: str | None = None,
    model_version: str | None = None,
    tenant: str | None = None,
    unit_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Distinct predictions matching the filters (unit_id in its stored form)."""
    where, params = _where(
        {
            "model": ("model = {model:String}", model),
            "model_version": ("model_version = {model_version:String}", model_version),
            "tenant": ("tenant = {tenant:String}", tenant),
            "unit_id": ("unit_id = {unit_id:String}", unit_id),
            "since": ("started_at >= {since:DateTime64(3, 'UTC')}", since),
            "until": ("started_at < {until:DateTime64(3, 'UTC')}", until),
        }
    )
    return int(client.query(f"SELECT count() FROM predictions FINAL{where}", parameters=params).result_rows[0][0])


def count_feedback(
    client: Client,
    *,
    prediction_id: str | None = None,
    tenant: str | None = None,
    unit_id: str | None = None,
) -> int:
    where, params = _where(
        {
            "prediction_id": ("prediction_id = {prediction_id:String}", prediction_id),
            "tenant": ("tenant = {tenant:String}", tenant),
            "unit_id": ("unit_id = {unit_id:String}", unit_id),
        }
    )
    return int(client.query(f"SELECT count() FROM feedback FINAL{where}", parameters=params).result_rows[0][0])


def count_alerts(client: Client) -> int:
    return int(client.query("SELECT count() FROM alerts FINAL").result_rows[0][0])


def duplicate_rows(client: Client, table: str, key: str) -> int:
    """Physical rows not yet collapsed by a merge (diagnostics: redelivery happened)."""
    if (table, key) not in {("predictions", "prediction_id"), ("feedback", "feedback_id"), ("alerts", "alert_id")}:
        raise ValueError(f"unknown table/key {table}.{key}")
    return int(client.query(f"SELECT count() - uniqExact({key}) FROM {table}").result_rows[0][0])


@dataclass(frozen=True)
class LabeledPrediction:
    prediction_id: str
    model: str
    model_version: str
    variant: str
    started_at: datetime
    label: str
    rating: float | None
    outcome: str


def labeled_predictions(client: Client, *, model: str | None = None, limit: int = 10_000) -> list[LabeledPrediction]:
    """Feedback joined to its prediction: the label next to the model version that served it."""
    where = " WHERE p.model = {model:String}" if model is not None else ""
    params: dict[str, Any] = {"limit": limit}
    if model is not None:
        params["model"] = model
    rows = client.query(
        "SELECT p.prediction_id, p.model, p.model_version, p.variant, p.started_at, f.label, f.rating, f.outcome "
        "FROM feedback AS f FINAL INNER JOIN predictions AS p FINAL ON f.prediction_id = p.prediction_id"
        f"{where} ORDER BY p.started_at, p.prediction_id LIMIT {{limit:UInt64}}",
        parameters=params,
    ).result_rows
    return [LabeledPrediction(*row) for row in rows]


def rows_for_unit(client: Client, stored_unit_id: str) -> dict[str, int]:
    """Physical rows (duplicates included) holding this user's data, per table."""
    params = {"unit": stored_unit_id}
    predictions = client.query("SELECT count() FROM predictions WHERE unit_id = {unit:String}", parameters=params)
    feedback = client.query(
        "SELECT count() FROM feedback WHERE unit_id = {unit:String} OR prediction_id IN "
        "(SELECT prediction_id FROM predictions WHERE unit_id = {unit:String})",
        parameters=params,
    )
    return {"predictions": int(predictions.result_rows[0][0]), "feedback": int(feedback.result_rows[0][0])}
