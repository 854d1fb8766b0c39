"""Live canary metrics as a MetricSource, so promotion rules run unchanged against a canary.

The rollout controller fills one LiveMetrics per variant from the router's counters (requests,
errors, latency p95, optionally cost) and, to allow ``delta.*`` rules, attaches the stable
variant's LiveMetrics as ``baseline``. Names a rule can use:

- ``error_rate``: errors / requests with a Wilson interval (so ``error_rate.upper_ci <= 0.01``
  means "with 95% confidence the error rate is at most 1%", not "so far we saw few errors");
  ``delta.error_rate``: candidate minus baseline, Newcombe interval and z-test p-value;
- ``requests``: the number of requests (point and n), e.g. ``requests.point >= 1000``;
- ``latency_p95_ms``, ``cost_per_1k_tokens_usd`` and anything in ``gauges``: point only;
  ``delta.<name>``: the point difference.

Live traffic has no evaluation slices or pass metrics: rules that need them give "missing".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.registry.estimates import (
    ArmComparison,
    Estimate,
    MetricRef,
    MissingMetric,
    is_count_metric,
    point_only,
    two_proportion_delta,
    wilson,
)


@dataclass(frozen=True)
class LiveMetrics:
    """One variant's counters over the canary window."""

    variant: str
    requests: int
    errors: int = 0
    latency_p95_ms: float | None = None
    cost_per_1k_tokens_usd: float | None = None
    gauges: Mapping[str, float] = field(default_factory=dict)
    baseline: LiveMetrics | None = None

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.errors <= self.requests:
            raise ValueError(f"need 0 <= errors ({self.errors}) <= requests ({self.requests})")

    def _gauge(self, name: str) -> float | None:
        if name == "latency_p95_ms":
            return self.latency_p95_ms
        if name == "cost_per_1k_tokens_usd":
            return self.cost_per_1k_tokens_usd
        return self.gauges.get(name)

    def _own(self, metric: str, confidence: float) -> Estimate:
        if metric == "error_rate":
            if self.requests == 0:
                raise MissingMetric(f"variant {self.variant!r} has served no requests yet")
            return wilson(self.errors, self.requests, confidence)
        if metric == "requests":
            return point_only(self.requests, n=self.requests)
        value = self._gauge(metric)
        if value is None:
            raise MissingMetric(f"live metrics of variant {self.variant!r} have no {metric!r}")
        return point_only(value)

    def resolve(self, ref: MetricRef, confidence: float) -> Estimate:
        """See MetricSource."""
        if ref.slice is not None or ref.scope == "aggregate" or is_count_metric(ref.metric):
            raise MissingMetric(f"live metrics have no evaluation slices or pass metrics ({ref})")
        candidate = self._own(ref.metric, confidence)
        if ref.scope == "candidate":
            return candidate
        if self.baseline is None:
            raise MissingMetric(f"no baseline variant attached to live metrics of {self.variant!r}")
        if ref.metric == "error_rate":
            if self.baseline.requests == 0:
                raise MissingMetric(f"baseline variant {self.baseline.variant!r} has served no requests yet")
            return two_proportion_delta(
                self.errors, self.requests, self.baseline.errors, self.baseline.requests, confidence
            )
        baseline = self.baseline._own(ref.metric, confidence)
        return point_only(candidate.point - baseline.point, method="candidate - baseline")

    def compare(self, slice_name: str, metric: str) -> ArmComparison:
        """See MetricSource: live traffic has no slices."""
        raise MissingMetric(f"live metrics have no evaluation slices (asked for {slice_name!r})")

    def pass_metrics(self, slice_name: str) -> Sequence[str]:
        """See MetricSource: live traffic has no slices."""
        raise MissingMetric(f"live metrics have no evaluation slices (asked for {slice_name!r})")
