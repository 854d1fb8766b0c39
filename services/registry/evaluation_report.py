"""The offline evaluation report a promotion policy is evaluated against.

A report holds, per evaluation slice, the results of the baseline (the version being replaced)
and the candidate on the same cases: the number of cases, the passes per pass metric
(``success@1``, ``success@5``: any ``name@k``), the number of cases with at least one rule
violation, and optionally the per-case results (case id -> {metric: passed}), which make
paired regression checks possible. Operational metrics measured offline (latency p95, cost) are
given per arm, as a number or as ``{point, lower_ci, upper_ci, n}``.

YAML (or JSON) shape::

    model: triage-llm
    baseline: {version: "7", operational: {latency_p95_ms: 820}}
    candidate: {version: "8", operational: {latency_p95_ms: 780, cost_per_1k_tokens_usd: 0.016}}
    slices:
      division_hard:
        baseline:  {n: 400, passes: {success@1: 220}, rule_violations: 4}
        candidate: {n: 400, passes: {success@1: 272}, rule_violations: 3}
      tiny_slice:
        baseline:  {cases: {c1: {success@1: true}, c2: {success@1: false}}}
        candidate: {cases: {c1: {success@1: true}, c2: {success@1: true}}}

With ``cases``, ``n`` and ``passes`` are derived (and checked if also given). The report only
holds counts; every interval and p-value is computed from them (see estimates.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.registry.estimates import (
    RULE_VIOLATION_RATE,
    ArmComparison,
    Estimate,
    InvalidReference,
    MetricRef,
    MissingMetric,
    is_count_metric,
    is_pass_metric,
    point_only,
    two_proportion_delta,
    wilson,
)


class OperationalValue(BaseModel):
    """An operational metric measured with its own uncertainty (e.g. a bootstrap CI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    point: float
    lower_ci: float | None = None
    upper_ci: float | None = None
    n: int | None = Field(default=None, ge=0)

    def estimate(self) -> Estimate:
        return Estimate(point=self.point, lower_ci=self.lower_ci, upper_ci=self.upper_ci, n=self.n)


class ArmInfo(BaseModel):
    """Which version an arm is, and what it measured outside the slices."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = None
    operational: dict[str, float | OperationalValue] = Field(default_factory=dict)

    @field_validator("operational")
    @classmethod
    def _operational_names(cls, value: dict[str, float | OperationalValue]) -> dict[str, float | OperationalValue]:
        for name in value:
            if is_count_metric(name):
                raise ValueError(f"{name!r} is a count metric; give it per slice, not under operational")
        return value

    def operational_estimate(self, name: str) -> Estimate | None:
        value = self.operational.get(name)
        if value is None:
            return None
        return value.estimate() if isinstance(value, OperationalValue) else point_only(value)


class ArmSlice(BaseModel):
    """One arm's results on one slice.

    rule_violations counts cases with at least one violation, so it is a proportion of n."""

    model_config = ConfigDict(extra="forbid")

    n: int | None = Field(default=None, ge=0)
    passes: dict[str, int] = Field(default_factory=dict)
    rule_violations: int | None = Field(default=None, ge=0)
    cases: dict[str, dict[str, bool]] | None = None

    @field_validator("cases", mode="before")
    @classmethod
    def _case_ids_as_text(cls, value: Any) -> Any:
        # YAML reads `101:` as an int key; case ids are names.
        if isinstance(value, Mapping):
            return {str(key): item for key, item in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ArmSlice:
        if self.cases is not None:
            self._derive_from_cases(self.cases)
        if self.n is None:
            raise ValueError("give n (or per-case results in cases)")
        for metric, count in self.passes.items():
            if not is_pass_metric(metric):
                raise ValueError(f"pass metric {metric!r} must be named name@k, e.g. success@1")
            if not 0 <= count <= self.n:
                raise ValueError(f"passes[{metric}] = {count} is outside [0, n={self.n}]")
        if self.rule_violations is not None and self.rule_violations > self.n:
            raise ValueError(f"rule_violations = {self.rule_violations} exceeds n = {self.n}")
        return self

    def _derive_from_cases(self, cases: dict[str, dict[str, bool]]) -> None:
        if self.n is not None and self.n != len(cases):
            raise ValueError(f"n = {self.n} but cases has {len(cases)} entries")
        self.n = len(cases)
        metrics = set(next(iter(cases.values()), {}))
        for case_id, results in cases.items():
            if set(results) != metrics:
                raise ValueError(f"case {case_id!r} reports {sorted(results)}, others report {sorted(metrics)}")
        for metric in metrics:
            derived = sum(1 for results in cases.values() if results[metric])
            given = self.passes.get(metric)
            if given is not None and given != derived:
                raise ValueError(f"passes[{metric}] = {given} but cases give {derived}")
            self.passes[metric] = derived

    def counts(self, metric: str) -> tuple[int, int] | None:
        """(count, n) of a count metric, or None when this arm does not report it."""
        count = self.rule_violations if metric == RULE_VIOLATION_RATE else self.passes.get(metric)
        if count is None or self.n is None:
            return None
        return count, self.n

    def case_results(self, metric: str) -> dict[str, bool] | None:
        if not self.cases or metric not in next(iter(self.cases.values())):
            return None
        return {case_id: results[metric] for case_id, results in self.cases.items()}


class SliceResult(BaseModel):
    """Both arms on one slice. A slice new in this evaluation may have no baseline."""

    model_config = ConfigDict(extra="forbid")

    baseline: ArmSlice | None = None
    candidate: ArmSlice


class EvaluationReport(BaseModel):
    """Baseline vs candidate evaluation results; a MetricSource for promotion policies."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    baseline: ArmInfo = Field(default_factory=ArmInfo)
    candidate: ArmInfo = Field(default_factory=ArmInfo)
    slices: dict[str, SliceResult] = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_yaml(cls, text: str) -> EvaluationReport:
        """Parses YAML (or JSON, which YAML reads too)."""
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"))

    # --- MetricSource ---------------------------------------------------------------------

    def _slice(self, name: str) -> SliceResult:
        result = self.slices.get(name)
        if result is None:
            raise InvalidReference(f"unknown slice {name!r} (report has: {', '.join(sorted(self.slices))})")
        return result

    def resolve(self, ref: MetricRef, confidence: float) -> Estimate:
        """See MetricSource. Count metrics come from the slices, operational ones from the arms."""
        if is_count_metric(ref.metric):
            return self._resolve_count(ref, confidence)
        if ref.slice is not None or ref.scope == "aggregate":
            raise InvalidReference(f"{ref.metric} is an operational metric: it has no slices to pool or pick")
        candidate = self.candidate.operational_estimate(ref.metric)
        if candidate is None:
            raise MissingMetric(f"the report has no operational metric {ref.metric!r} for the candidate")
        if ref.scope == "candidate":
            return candidate
        baseline = self.baseline.operational_estimate(ref.metric)
        if baseline is None:
            raise MissingMetric(f"the report has no operational metric {ref.metric!r} for the baseline")
        return point_only(candidate.point - baseline.point, method="candidate - baseline")

    def _resolve_count(self, ref: MetricRef, confidence: float) -> Estimate:
        metric = ref.metric
        if ref.scope == "aggregate" or (ref.scope == "delta" and ref.slice is None):
            return self._pooled(ref, confidence)
        if ref.slice is None:
            raise InvalidReference(f"{metric} needs a slice: {metric}(slice)")
        result = self._slice(ref.slice)
        candidate = _require_counts(result.candidate, metric, f"candidate on {ref.slice}")
        if ref.scope == "candidate":
            return wilson(*candidate, confidence)
        if result.baseline is None:
            raise MissingMetric(f"slice {ref.slice!r} has no baseline results")
        baseline = _require_counts(result.baseline, metric, f"baseline on {ref.slice}")
        return two_proportion_delta(*candidate, *baseline, confidence)

    def _pooled(self, ref: MetricRef, confidence: float) -> Estimate:
        """aggregate.M: candidate counts summed over every slice that reports M. delta.M without a
        slice: the same over slices where both arms report M. Pooling ignores slice weights on
        purpose: it is the pass rate over all evaluated cases."""
        c = cn = b = bn = slices = 0
        for result in self.slices.values():
            cand = result.candidate.counts(ref.metric)
            if cand is None or cand[1] == 0:
                continue
            if ref.scope == "delta":
                base = result.baseline.counts(ref.metric) if result.baseline else None
                if base is None or base[1] == 0:
                    continue
                b, bn = b + base[0], bn + base[1]
            c, cn, slices = c + cand[0], cn + cand[1], slices + 1
        if slices == 0:
            raise MissingMetric(f"no slice reports {ref.metric}" + (" for both arms" if ref.scope == "delta" else ""))
        estimate = two_proportion_delta(c, cn, b, bn, confidence) if ref.scope == "delta" else wilson(c, cn, confidence)
        return Estimate(
            point=estimate.point,
            lower_ci=estimate.lower_ci,
            upper_ci=estimate.upper_ci,
            p_value=estimate.p_value,
            n=estimate.n,
            method=f"{estimate.method}, pooled over {slices} slice{'s' if slices != 1 else ''}",
        )

    def compare(self, slice_name: str, metric: str) -> ArmComparison:
        """See MetricSource."""
        result = self._slice(slice_name)
        if result.baseline is None:
            raise MissingMetric(f"slice {slice_name!r} has no baseline results")
        c, cn = _require_counts(result.candidate, metric, f"candidate on {slice_name}")
        b, bn = _require_counts(result.baseline, metric, f"baseline on {slice_name}")
        cand_cases = result.candidate.case_results(metric)
        base_cases = result.baseline.case_results(metric)
        if cand_cases is None or base_cases is None:
            return ArmComparison(c, cn, b, bn)
        shared = base_cases.keys() & cand_cases.keys()
        pairs = {case: (base_cases[case], cand_cases[case]) for case in sorted(shared)}
        unpaired = len(base_cases.keys() ^ cand_cases.keys())
        return ArmComparison(c, cn, b, bn, pairs=pairs, unpaired=unpaired)

    def pass_metrics(self, slice_name: str) -> Sequence[str]:
        """See MetricSource."""
        result = self._slice(slice_name)
        if result.baseline is None:
            return []
        return sorted(result.baseline.passes.keys() & result.candidate.passes.keys())


def _require_counts(arm: ArmSlice, metric: str, where: str) -> tuple[int, int]:
    counts = arm.counts(metric)
    if counts is None:
        raise MissingMetric(f"no {metric} for the {where}")
    if counts[1] == 0:
        raise MissingMetric(f"the {where} has no cases")
    return counts
