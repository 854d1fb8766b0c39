"""Scheduled drift checks: compute drift for configured models and publish AlertEvents.

Every `schedule_interval_s` each configured check compares the last `window_minutes` with its
reference profile; every feature whose status reaches `alert_min_status` becomes one
mlmesh.v1.AlertEvent (kind "drift") on the alerts topic, keyed by its alert id. The id is derived
from (model, profile, feature, method, window end), so re-publishing the same finding (a retry)
collapses into one row in the logger's `alerts` table. A failing check is logged and retried on
the next tick; it never stops the others, nor the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import errors
from services.common.api import events_pb2
from services.common.kafka import KafkaSettings, ensure_topics, make_producer
from services.drift.service import DriftCheck, DriftReport, DriftService
from services.drift.settings import DriftSettings, ScheduledCheck

log = logging.getLogger(__name__)

_ALERT_NAMESPACE = uuid.UUID("0d1c3f8e-5b1e-4b7a-9f43-6a2f5b0d7e11")
_SEVERITY = {"warn": "warning", "alert": "critical"}
_RANK = {"ok": 0, "warn": 1, "alert": 2}


def _metric_value(check: DriftCheck) -> tuple[str, float, float]:
    """(metric, value, threshold crossed) on the scale its status was decided on."""
    level = "alert" if check.status == "alert" else "warn"
    if check.method == "chi_square":  # status from the divergence (effect) and the p-value
        return "chi_square_divergence", check.details.get("divergence", check.statistic), check.details.get(level, 0.0)
    return check.method, check.statistic, check.details.get(level, 0.0)


def alerts_for(report: DriftReport, *, min_status: str = "alert", now: datetime | None = None) -> list[Any]:
    """One AlertEvent per feature at or above min_status (its most severe check, first by method order)."""
    created = now or datetime.now(UTC)
    worst: dict[tuple[str, str], DriftCheck] = {}
    for check in report.checks:
        key = (check.source, check.feature)
        if _RANK[check.status] >= _RANK[min_status] and (
            key not in worst or _RANK[check.status] > _RANK[worst[key].status]
        ):
            worst[key] = check
    events = []
    end = report.window_end.astimezone(UTC).isoformat()
    for (source, feature), check in worst.items():
        metric, value, threshold = _metric_value(check)
        alert_id = uuid.uuid5(
            _ALERT_NAMESPACE, "|".join([report.model, report.model_version, report.profile_id, source, feature, end])
        )
        event = events_pb2.AlertEvent(
            schema_version=1,
            alert_id=str(alert_id),
            severity=_SEVERITY[check.status],
            kind="drift",
            model=report.model,
            model_version=report.model_version,
            metric=metric,
            value=float(value),
            threshold=float(threshold),
            message=(
                f"{source} feature {feature!r} of {report.model} drifted ({check.status}): {metric} {value:.4g} "
                f"vs {threshold:.4g} over [{report.window_start.isoformat()}, {end}), profile {report.profile_id}"
            ),
            labels={
                "feature": feature,
                "source": source,
                "status": check.status,
                "method": check.method,
                "profile_id": report.profile_id,
                "window_start": report.window_start.astimezone(UTC).isoformat(),
                "window_end": end,
                "n_current": str(int(check.details.get("n_current", 0))),
                **({"p_value": f"{check.p_value:.3g}"} if check.p_value is not None else {}),
            },
        )
        event.created_at.FromDatetime(created.astimezone(UTC).replace(tzinfo=None))
        events.append(event)
    return events


class AlertPublisher:
    """kafka-python producer (services.common.kafka.make_producer), created on first use; blocking."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float = 15.0) -> None:
        self.kafka = kafka
        self.timeout_s = timeout_s
        self._producer: Any = None
        self._lock = threading.Lock()

    def publish(self, events: list[Any]) -> int:
        """Sends and waits for every ack (acks=all); raises when the broker does not confirm."""
        if not events:
            return 0
        with self._lock:
            if self._producer is None:
                ensure_topics(self.kafka, [self.kafka.alerts_topic], timeout_s=self.timeout_s)
                self._producer = make_producer(self.kafka)
            futures = [
                self._producer.send(self.kafka.alerts_topic, key=e.alert_id.encode(), value=e.SerializeToString())
                for e in events
            ]
            self._producer.flush(timeout=self.timeout_s)
            for future in futures:
                future.get(timeout=self.timeout_s)
        return len(events)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=self.timeout_s)
                self._producer = None


@dataclass
class SchedulerStats:
    ticks: int = 0
    checks_run: int = 0
    alerts_published: int = 0
    failures: int = 0
    last_error: str = ""
    last_reports: dict[str, DriftReport] = field(default_factory=dict)


class DriftScheduler:
    """Runs the configured checks every interval (asyncio task; the work runs in threads)."""

    def __init__(self, service: DriftService, settings: DriftSettings, publisher: AlertPublisher | None = None) -> None:
        self.service = service
        self.settings = settings
        self.publisher = publisher or AlertPublisher(settings.kafka)
        self.stats = SchedulerStats()
        self._task: asyncio.Task[None] | None = None

    def run_check(self, check: ScheduledCheck, *, now: datetime | None = None) -> int:
        """One check, blocking: computes drift over the last window_minutes, publishes its alerts."""
        end = now or datetime.now(UTC)
        report = self.service.compute_drift(
            check.model, check.model_version, end - timedelta(minutes=check.window_minutes), end, check.profile_id
        )
        self.stats.last_reports[check.model] = report
        events = alerts_for(report, min_status=self.settings.alert_min_status, now=end)
        published = self.publisher.publish(events)
        if published:
            log.warning("drift on %s: %d alert(s) published (%s)", check.model, published, report.status)
        return published

    def run_once(self, *, now: datetime | None = None) -> int:
        """Every check once; failures are counted and logged, the others still run."""
        published = 0
        self.stats.ticks += 1
        for check in self.settings.checks:
            try:
                published += self.run_check(check, now=now)
                self.stats.checks_run += 1
            except errors.FailedPrecondition as error:  # e.g. no profile yet: not an outage
                self.stats.last_error = error.message
                log.info("scheduled drift check of %s skipped: %s", check.model, error.message)
            except Exception as error:
                self.stats.failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                log.exception("scheduled drift check of %s failed", check.model)
        self.stats.alerts_published += published
        return published

    async def _loop(self) -> None:
        interval = self.settings.schedule_interval_s
        while True:
            started = time.monotonic()
            await asyncio.to_thread(self.run_once)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def start(self) -> None:
        if self.settings.schedule_interval_s > 0 and self.settings.checks and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="mlmesh-drift-scheduler")
            log.info(
                "scheduled drift checks every %.0f s for %s",
                self.settings.schedule_interval_s,
                ", ".join(c.model for c in self.settings.checks),
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.publisher.close)
