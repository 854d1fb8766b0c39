"""Router counters: one series per key, fixed latency buckets, TargetCounters snapshots."""

from __future__ import annotations

import math

from services.common.api import routing_pb2
from services.router.metrics import LATENCY_BOUNDS_MS, RouterMetrics, latency_quantile_ms


def test_series_are_created_once_per_key() -> None:
    metrics = RouterMetrics()
    a = metrics.series("m", "exp", "canary", "2")
    assert metrics.series("m", "exp", "canary", "2") is a
    assert metrics.series("m", "exp", "canary", "2", shadow=True) is not a
    assert metrics.series("m", "exp", "stable", "2") is not a
    assert metrics.get("m", "exp", "canary", "2") is a
    assert metrics.get("m", "exp", "canary", "3") is None


def test_latency_buckets_are_upper_inclusive_with_overflow() -> None:
    series = RouterMetrics().series("m", "", "stable", "1")
    for latency in (0.2, 1.0, 1.0001, 2.0, 49.9, 5000.0, 5000.1, 1e9):
        series.observe(latency)
    counts = series.latency_counts
    assert counts is not None and len(counts) == len(LATENCY_BOUNDS_MS) + 1
    assert counts[0] == 2  # <= 1 ms
    assert counts[1] == 2  # (1, 2]
    assert counts[LATENCY_BOUNDS_MS.index(50)] == 1
    assert counts[LATENCY_BOUNDS_MS.index(5000)] == 1
    assert counts[-1] == 2  # > 5000 ms
    assert sum(counts) == 8


def test_snapshot_reports_touched_series_as_target_counters() -> None:
    metrics = RouterMetrics()
    metrics.series("idle", "", "stable", "1")
    canary = metrics.series("m", "exp", "canary", "2")
    canary.requests, canary.errors, canary.fallbacks, canary.in_flight = 10, 3, 2, 1
    canary.observe(7.0)
    shadow = metrics.series("m", "", "shadow", "3", shadow=True)
    shadow.dropped = 4  # only drops so far: still reported
    snapshot = metrics.snapshot()
    assert all(isinstance(c, routing_pb2.TargetCounters) for c in snapshot)
    by_variant = {c.variant: c for c in snapshot}
    assert set(by_variant) == {"canary", "shadow"}
    c = by_variant["canary"]
    assert (c.model, c.experiment, c.model_version, c.shadow) == ("m", "exp", "2", False)
    assert (c.requests, c.errors, c.fallbacks, c.in_flight) == (10, 3, 2, 1)
    assert list(c.latency_bounds_ms) == list(LATENCY_BOUNDS_MS)
    assert len(c.latency_counts) == len(LATENCY_BOUNDS_MS) + 1
    assert c.latency_counts[LATENCY_BOUNDS_MS.index(10)] == 1
    assert by_variant["shadow"].shadow is True
    # A snapshot is a copy: later traffic does not change it.
    canary.requests += 1
    assert c.requests == 10


def test_latency_quantile_reads_bucket_upper_bounds() -> None:
    series = RouterMetrics().series("m", "", "stable", "1")
    assert latency_quantile_ms(series.latency_counts or [], 0.95) == 0.0
    for _ in range(90):
        series.observe(3.0)
    for _ in range(10):
        series.observe(300.0)
    counts = series.latency_counts or []
    assert latency_quantile_ms(counts, 0.5) == 5.0
    assert latency_quantile_ms(counts, 0.95) == 500.0
    series.observe(1e6)
    assert math.isinf(latency_quantile_ms(counts, 1.0))
