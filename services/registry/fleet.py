"""What the registry knows about its routers: the table each one serves and its counters.

Routers report cumulative counters; the rollout controller asks for the traffic of one variant
since a baseline snapshot. A router that restarted (counters went down) counts from zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.common.api import routing_pb2

ROUTER_STALE_AFTER_S = 10.0


@dataclass(slots=True)
class Traffic:
    """Requests of one variant: counts and a latency histogram (bounds in ms, +inf last)."""

    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    in_flight: int = 0
    bounds_ms: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Requests this variant did not answer itself: errors, and those an open circuit breaker
        sent straight to stable (counted as fallbacks, never as errors, by the router)."""
        return min(self.requests, max(self.errors, self.fallbacks))

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def add(self, other: Traffic, sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.errors += sign * other.errors
        self.fallbacks += sign * other.fallbacks
        self.in_flight += other.in_flight if sign > 0 else 0
        if other.bounds_ms:
            if not self.bounds_ms:
                self.bounds_ms = other.bounds_ms
                self.counts = [0] * len(other.counts)
            if self.bounds_ms == other.bounds_ms:
                self.counts = [a + sign * b for a, b in zip(self.counts, other.counts, strict=True)]

    def latency_quantile_ms(self, q: float) -> float:
        """Interpolated within the histogram bucket; the open top bucket reports its lower bound."""
        total = sum(self.counts)
        if total <= 0:
            return 0.0
        rank = q * total
        seen = 0
        lower = 0.0
        for i, count in enumerate(self.counts):
            upper = self.bounds_ms[i] if i < len(self.bounds_ms) else lower
            if count > 0 and seen + count >= rank:
                if i >= len(self.bounds_ms):
                    return lower
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
            lower = upper
        return lower


def _traffic_of(counter: routing_pb2.TargetCounters) -> Traffic:
    return Traffic(
        requests=counter.requests,
        errors=counter.errors,
        fallbacks=counter.fallbacks,
        in_flight=counter.in_flight,
        bounds_ms=tuple(counter.latency_bounds_ms),
        counts=list(counter.latency_counts),
    )


@dataclass(slots=True)
class RouterState:
    router_id: str
    table_version: int
    seen_at: float
    uptime_s: float
    counters: list[routing_pb2.TargetCounters]


# Per router: (uptime at the snapshot, cumulative traffic per key).
Snapshot = dict[str, tuple[float, dict[tuple, Traffic]]]


class RouterFleet:
    def __init__(self) -> None:
        self._routers: dict[str, RouterState] = {}
        self._changed = asyncio.Condition()

    async def report(self, report: routing_pb2.RouterMetricsReport) -> None:
        self._routers[report.router_id] = RouterState(
            report.router_id, report.table_version, time.monotonic(), report.uptime_s, list(report.counters)
        )
        async with self._changed:
            self._changed.notify_all()

    def live_routers(self) -> list[RouterState]:
        now = time.monotonic()
        return [r for r in self._routers.values() if now - r.seen_at <= ROUTER_STALE_AFTER_S]

    async def wait_applied(self, table_version: int, timeout_s: float) -> bool:
        """True once every live router serves table_version or newer (also when none is live)."""
        return await self.wait_until(
            lambda: all(r.table_version >= table_version for r in self.live_routers()), timeout_s
        )

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float, min_reports: int = 0) -> bool:
        """Re-checks `condition` at every report (after `min_reports` more) until it holds or time is up."""
        deadline = time.monotonic() + timeout_s
        reports = 0
        async with self._changed:
            while True:
                if reports >= min_reports and (condition() or (min_reports and not self.live_routers())):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                    reports += 1
                except TimeoutError:
                    if not self.live_routers():
                        reports = min_reports

    def _matching(self, model: str, keys: Iterable[tuple[str, str]]) -> dict[str, dict[tuple, Traffic]]:
        wanted = set(keys)
        per_router: dict[str, dict[tuple, Traffic]] = {}
        for router in self.live_routers():
            bucket = per_router.setdefault(router.router_id, {})
            for c in router.counters:
                key = (c.variant, c.model_version)
                if c.model == model and not c.shadow and key in wanted:
                    bucket.setdefault(key, Traffic()).add(_traffic_of(c))
                elif c.model == model and c.shadow and ("shadow", c.model_version) in wanted:
                    bucket.setdefault(("shadow", c.model_version), Traffic()).add(_traffic_of(c))
        return per_router

    def snapshot(self, model: str, keys: Iterable[tuple[str, str]]) -> Snapshot:
        uptimes = {r.router_id: r.uptime_s for r in self.live_routers()}
        return {rid: (uptimes.get(rid, 0.0), traffic) for rid, traffic in self._matching(model, keys).items()}

    def since(self, model: str, key: tuple[str, str], baseline: Snapshot) -> Traffic:
        """Traffic of (variant, model_version) since `baseline`, summed over live routers."""
        total = Traffic()
        matching = self._matching(model, [key])
        for router in self.live_routers():
            current = matching.get(router.router_id, {}).get(key)
            if current is None:
                continue
            total.add(current)
            base_uptime, base = baseline.get(router.router_id, (0.0, {}))
            earlier = base.get(key)
            if earlier is not None and router.uptime_s >= base_uptime and current.requests >= earlier.requests:
                total.add(earlier, sign=-1)
        return total

    def in_flight(self, model: str, model_version: str) -> int:
        return sum(
            c.in_flight
            for r in self.live_routers()
            for c in r.counters
            if c.model == model and c.model_version == model_version
        )
