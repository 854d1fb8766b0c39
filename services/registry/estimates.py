"""Estimates with uncertainty, and the statistics that produce them.

Promotion rules compare *estimates*, not raw numbers: "success@1 is 0.86" on 50 cases and on
5,000 cases are different claims, so every count-based metric carries a confidence interval and
deltas carry a p-value. The statistics here are deliberately few and standard:

- a proportion (passes / n, violations / n, errors / requests): Wilson score interval
  (statsmodels ``proportion_confint(method="wilson")``), which behaves at 0 and 1 and for small
  n, where the Wald interval collapses to zero width;
- a difference of two independent proportions (candidate minus baseline): Newcombe's hybrid
  score interval (statsmodels ``confint_proportions_2indep(method="newcomb")``, built from the
  two Wilson intervals) and a two-sided two-proportion z-test with pooled variance
  (statsmodels ``proportions_ztest``). Two-sided because a rule decides the direction itself
  (pair ``delta.M(s).p_value < 0.05`` with ``delta.M(s).point >= ...`` or ``lower_ci > 0``):
  a one-sided p at the same nominal alpha would double the rate of promoting a candidate that
  is not better;
- a decrease test (used by ``no_regressions_on`` when only counts exist): the same z-test,
  one-sided, H1 "candidate rate < baseline rate";
- paired per-case results: McNemar's exact test on the discordant cases (statsmodels
  ``mcnemar(exact=True)``), reported as extra information.

This module also defines what every metric source implements (``MetricSource``), so the same
rules evaluate against an offline evaluation report and against live canary metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint, proportions_ztest

FIELDS: tuple[str, ...] = ("point", "lower_ci", "upper_ci", "p_value", "n")
"""The fields of an Estimate that a rule may compare."""

RULE_VIOLATION_RATE = "rule_violation_rate"

Scope = Literal["candidate", "aggregate", "delta"]


def is_count_metric(name: str) -> bool:
    """Count metrics are proportions with a denominator: ``name@k`` pass metrics and
    ``rule_violation_rate``. Everything else is an operational metric (latency, cost...)."""
    return name == RULE_VIOLATION_RATE or is_pass_metric(name)


def is_pass_metric(name: str) -> bool:
    """``name@k`` (success@1, success@5, ...): a per-case pass/fail metric."""
    base, sep, k = name.partition("@")
    return bool(sep) and bool(base) and k.isdigit()


@dataclass(frozen=True, slots=True)
class Estimate:
    """A value with optional uncertainty. Absent parts are None, never 0: a rule that compares a
    field the estimate lacks is an error, not a pass."""

    point: float
    lower_ci: float | None = None
    upper_ci: float | None = None
    p_value: float | None = None
    n: int | None = None
    method: str = ""

    def get(self, name: str) -> float | int | None:
        """The field ``name`` (one of FIELDS)."""
        if name not in FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "point": self.point,
            "lower_ci": self.lower_ci,
            "upper_ci": self.upper_ci,
            "p_value": self.p_value,
            "n": self.n,
            "method": self.method,
        }

    def describe(self) -> str:
        """One line for reports: point, interval, p-value, n, method."""
        parts = [_fmt(self.point)]
        if self.lower_ci is not None or self.upper_ci is not None:
            parts.append(f"[{_fmt(self.lower_ci)}, {_fmt(self.upper_ci)}]")
        if self.p_value is not None:
            parts.append(f"p={self.p_value:.3g}")
        if self.n is not None:
            parts.append(f"n={self.n}")
        if self.method:
            parts.append(f"({self.method})")
        return " ".join(parts)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def point_only(value: float, *, n: int | None = None, method: str = "") -> Estimate:
    """An estimate without uncertainty (operational gauges such as latency p95 or cost)."""
    return Estimate(point=float(value), n=n, method=method)


def _check_counts(count: int, n: int) -> None:
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    if not 0 <= count <= n:
        raise ValueError(f"count {count} is outside [0, n={n}]")


def _alpha(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return 1.0 - confidence


def wilson(count: int, n: int, confidence: float = 0.95) -> Estimate:
    """count / n with a Wilson score interval at ``confidence`` (two-sided)."""
    _check_counts(count, n)
    lo, hi = proportion_confint(count, n, alpha=_alpha(confidence), method="wilson")
    # The bounds at 0 and n are exactly 0 and 1; statsmodels can be off by one ulp.
    return Estimate(
        point=count / n,
        lower_ci=0.0 if count == 0 else max(0.0, float(lo)),
        upper_ci=1.0 if count == n else min(1.0, float(hi)),
        n=n,
        method=f"Wilson {confidence:.0%}",
    )


def two_proportion_delta(count: int, n: int, base_count: int, base_n: int, confidence: float = 0.95) -> Estimate:
    """(count / n) - (base_count / base_n) for independent samples.

    Interval: Newcombe hybrid score (from the two Wilson intervals). p_value: two-sided
    two-proportion z-test with pooled variance; 1.0 when both arms are all-pass or all-fail
    (no difference can be observed, and the z statistic is 0/0). n is the smaller arm's n,
    so ``delta...n >= 300`` reads "each arm has at least 300 cases".
    """
    _check_counts(count, n)
    _check_counts(base_count, base_n)
    lo, hi = confint_proportions_2indep(
        count, n, base_count, base_n, method="newcomb", compare="diff", alpha=_alpha(confidence)
    )
    pooled = (count + base_count) / (n + base_n)
    if pooled in (0.0, 1.0):
        p_value = 1.0
    else:
        _, p = proportions_ztest([count, base_count], [n, base_n], alternative="two-sided")
        p_value = float(p)
    return Estimate(
        point=count / n - base_count / base_n,
        lower_ci=float(lo),
        upper_ci=float(hi),
        p_value=p_value,
        n=min(n, base_n),
        method=f"Newcombe {confidence:.0%}, two-sided z-test",
    )


def decrease_p_value(count: int, n: int, base_count: int, base_n: int) -> float:
    """One-sided p-value for H1 "candidate rate < baseline rate" (pooled two-proportion z-test).
    1.0 when the rates are equal at 0 or 1, where the test is undefined and nothing decreased."""
    _check_counts(count, n)
    _check_counts(base_count, base_n)
    pooled = (count + base_count) / (n + base_n)
    if pooled in (0.0, 1.0):
        return 1.0
    _, p = proportions_ztest([count, base_count], [n, base_n], alternative="smaller")
    return float(p)


def mcnemar_exact_p(regressed: int, improved: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts (baseline-pass /
    candidate-fail, and the reverse). 1.0 when there are no discordant pairs."""
    if regressed < 0 or improved < 0:
        raise ValueError("discordant counts must be >= 0")
    if regressed + improved == 0:
        return 1.0
    result = mcnemar([[0, regressed], [improved, 0]], exact=True)
    return float(result.pvalue)


# --- what a metric source is ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricRef:
    """What a rule's left-hand side points at, minus the field.

    scope "candidate": the candidate's value, of one slice (count metrics) or overall
    (operational metrics); "aggregate": a count metric pooled over every slice of the
    candidate; "delta": candidate minus baseline, of one slice or pooled (slice None).
    """

    metric: str
    scope: Scope = "candidate"
    slice: str | None = None

    def __str__(self) -> str:
        prefix = "" if self.scope == "candidate" else f"{self.scope}."
        arg = "" if self.slice is None else f"({self.slice})"
        return f"{prefix}{self.metric}{arg}"


class MissingMetric(LookupError):
    """The source does not have this metric (not measured, no cases, no baseline...).
    The rule's verdict is "missing", which blocks promotion."""


class InvalidReference(LookupError):
    """The reference cannot be right for this source (for example, a slice the report does not
    have): a policy authoring error. Verdict "error", or PolicyError in strict evaluation."""


@dataclass(frozen=True, slots=True)
class ArmComparison:
    """Baseline and candidate results of one metric on one slice, for regression checks.

    ``pairs`` maps case id -> (baseline passed, candidate passed) for the cases both arms report
    individually, or is None when either arm has only counts. ``unpaired`` counts case ids that
    only one arm has (they are left out of the paired comparison)."""

    candidate_passes: int
    candidate_n: int
    baseline_passes: int
    baseline_n: int
    pairs: Mapping[str, tuple[bool, bool]] | None = None
    unpaired: int = 0


@runtime_checkable
class MetricSource(Protocol):
    """Anything rules can be evaluated against: an EvaluationReport, LiveMetrics, or a test
    double. Implementations raise MissingMetric or InvalidReference, never return a default."""

    def resolve(self, ref: MetricRef, confidence: float) -> Estimate:
        """The estimate ``ref`` points at, with intervals at ``confidence``."""
        ...

    def compare(self, slice_name: str, metric: str) -> ArmComparison:
        """Baseline and candidate results of ``metric`` on ``slice_name`` (no_regressions_on)."""
        ...

    def pass_metrics(self, slice_name: str) -> Sequence[str]:
        """The name@k metrics both arms report for ``slice_name`` (no_regressions_on default)."""
        ...


@dataclass(frozen=True, slots=True)
class SliceRegression:
    """The outcome of a no-regression check of one metric on one slice."""

    slice: str
    metric: str
    method: Literal["paired", "test"]
    regressed: bool
    regressions: int | None = None
    case_ids: tuple[str, ...] = ()
    improvements: int | None = None
    p_value: float | None = None
    baseline_rate: float | None = None
    candidate_rate: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "slice": self.slice,
            "metric": self.metric,
            "method": self.method,
            "regressed": self.regressed,
            "regressions": self.regressions,
            "case_ids": list(self.case_ids),
            "improvements": self.improvements,
            "p_value": self.p_value,
            "baseline_rate": self.baseline_rate,
            "candidate_rate": self.candidate_rate,
            "detail": self.detail,
        }


RegressionMode = Literal["auto", "paired", "test"]


def check_regression(
    comparison: ArmComparison,
    slice_name: str,
    metric: str,
    *,
    mode: RegressionMode = "auto",
    alpha: float = 0.05,
    max_regressions: int = 0,
    max_case_ids: int = 20,
) -> SliceRegression:
    """Did ``metric`` regress on ``slice_name``? (The definition no_regressions_on uses.)

    paired (per-case results in both arms; the default whenever they exist): a regression is a
    case the baseline passed and the candidate fails; the slice regresses when there are more
    than ``max_regressions`` of them. McNemar's exact p is reported, not used for the verdict.
    test (counts only): the slice regresses when the candidate's rate is lower and a one-sided
    two-proportion z-test (H1: candidate < baseline) gives p < alpha.
    Raises MissingMetric when ``mode="paired"`` and per-case results are absent.
    """
    c, cn, b, bn = (
        comparison.candidate_passes,
        comparison.candidate_n,
        comparison.baseline_passes,
        comparison.baseline_n,
    )
    if cn <= 0 or bn <= 0:
        raise MissingMetric(f"{metric}({slice_name}) has no cases in one arm")
    c_rate, b_rate = c / cn, b / bn
    pairs = comparison.pairs
    if mode == "paired" and pairs is None:
        raise MissingMetric(f"{metric}({slice_name}): paired mode needs per-case results in both arms")
    if pairs is not None and mode != "test":
        if not pairs:
            raise MissingMetric(f"{metric}({slice_name}): the two arms share no case ids")
        regressed_ids = sorted(case for case, (base, cand) in pairs.items() if base and not cand)
        improvements = sum(1 for base, cand in pairs.values() if cand and not base)
        p = mcnemar_exact_p(len(regressed_ids), improvements)
        shown = ", ".join(regressed_ids[:max_case_ids]) + (" ..." if len(regressed_ids) > max_case_ids else "")
        detail = (
            f"{slice_name}/{metric}: paired over {len(pairs)} cases, {len(regressed_ids)} regressed"
            f" (allowed {max_regressions}), {improvements} improved, McNemar exact p={p:.3g}"
            + (f"; regressed: {shown}" if regressed_ids else "")
            + (f"; {comparison.unpaired} unpaired case ids ignored" if comparison.unpaired else "")
        )
        return SliceRegression(
            slice=slice_name,
            metric=metric,
            method="paired",
            regressed=len(regressed_ids) > max_regressions,
            regressions=len(regressed_ids),
            case_ids=tuple(regressed_ids),
            improvements=improvements,
            p_value=p,
            baseline_rate=b_rate,
            candidate_rate=c_rate,
            detail=detail,
        )
    p = decrease_p_value(c, cn, b, bn)
    regressed = c_rate < b_rate and p < alpha
    detail = (
        f"{slice_name}/{metric}: {b_rate:.4g} (n={bn}) -> {c_rate:.4g} (n={cn}),"
        f" one-sided decrease p={p:.3g} (alpha {alpha:g})"
    )
    return SliceRegression(
        slice=slice_name,
        metric=metric,
        method="test",
        regressed=regressed,
        p_value=p,
        baseline_rate=b_rate,
        candidate_rate=c_rate,
        detail=detail,
    )
