"""Router counters per (model, experiment, variant, model_version, shadow), cumulative since start.

The hot path holds a reference to its Series (looked up once per routing table, not per request)
and bumps plain ints: no locks, everything runs on one asyncio event loop. snapshot() turns them
into the TargetCounters messages the router reports to the registry.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from services.common.api import routing_pb2

LATENCY_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

SeriesKey = tuple[str, str, str, str, bool]


@dataclass(slots=True)
class Series:
    """Counters of one (model, experiment, variant, model_version, shadow).

    requests: requests routed to this series (including those an open breaker sent to stable);
    errors: failed calls to its target (before any fallback); fallbacks: its requests that the
    stable target answered; dropped: shadow copies not sent because too many were in flight.
    Latency is observed per call made to the target (not for requests short-circuited by a breaker).
    """

    model: str
    experiment: str
    variant: str
    model_version: str
    shadow: bool
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    in_flight: int = 0
    dropped: int = 0
    latency_counts: list[int] | None = None

    def __post_init__(self) -> None:
        if self.latency_counts is None:
            self.latency_counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)

    def observe(self, latency_ms: float) -> None:
        # Bucket i counts latencies <= LATENCY_BOUNDS_MS[i]; the last one is +inf.
        self.latency_counts[bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1  # type: ignore[index]

    @property
    def key(self) -> SeriesKey:
        return (self.model, self.experiment, self.variant, self.model_version, self.shadow)

    def to_proto(self) -> routing_pb2.TargetCounters:
        return routing_pb2.TargetCounters(
            model=self.model,
            experiment=self.experiment,
            variant=self.variant,
            model_version=self.model_version,
            shadow=self.shadow,
            requests=self.requests,
            errors=self.errors,
            fallbacks=self.fallbacks,
            latency_bounds_ms=LATENCY_BOUNDS_MS,
            latency_counts=self.latency_counts,
            in_flight=self.in_flight,
        )


class RouterMetrics:
    def __init__(self) -> None:
        self._series: dict[SeriesKey, Series] = {}

    def series(self, model: str, experiment: str, variant: str, model_version: str, shadow: bool = False) -> Series:
        """The series for this key, created on first use (then the same object for the process' life)."""
        key = (model, experiment, variant, model_version, shadow)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(model, experiment, variant, model_version, shadow)
        return found

    def get(self, model: str, experiment: str, variant: str, model_version: str, shadow: bool = False) -> Series | None:
        return self._series.get((model, experiment, variant, model_version, shadow))

    def all(self) -> list[Series]:
        return list(self._series.values())

    def snapshot(self) -> list[routing_pb2.TargetCounters]:
        """Every series that has seen traffic (or has calls in flight), as TargetCounters."""
        return [s.to_proto() for s in self._series.values() if s.requests or s.in_flight or s.dropped]


def latency_quantile_ms(counts: list[int], q: float) -> float:
    """Upper bound of the histogram bucket holding quantile q (inf when it is the overflow bucket)."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return float(LATENCY_BOUNDS_MS[index]) if index < len(LATENCY_BOUNDS_MS) else float("inf")
    return float("inf")
