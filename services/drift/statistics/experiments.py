"""Fixed-horizon A/B analysis: proportions, means, rank test, quantile bootstrap, SRM, CUPED, multiplicity.

Conventions: arguments come control first, treatment second; effects are ``treatment - control``;
``alpha`` is two-sided and intervals have confidence ``1 - alpha``. Functions that a service feeds
from SQL aggregates (``*_from_stats``, ``*_from_moments``) are the core; the raw-sample versions
compute the aggregates and call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from . import _validation as v
from ._common import MetricResult, Seed, decide, difference_result, ratio_lift_ci, rng_from

# ------------------------------------------------------------------------------- two proportions


def two_proportion_ztest(
    successes_control: int,
    trials_control: int,
    successes_treatment: int,
    trials_treatment: int,
    *,
    alpha: float = 0.05,
    metric: str = "conversion",
) -> MetricResult:
    """Two-sided two-proportion z-test with intervals for the difference and the relative lift.

    * p-value: statsmodels ``proportions_ztest`` (pooled variance under H0, the classic z-test).
    * difference interval: Newcombe's hybrid score interval (``confint_proportions_2indep``,
      ``method="newcomb"``), which keeps nominal coverage for small rates where Wald undercovers.
    * relative lift interval: ratio interval with the log-adjusted method, minus 1.

    The pooled test and the Newcombe interval are different constructions, so in rare borderline
    cases the interval can touch 0 while p < alpha; ``decision`` follows the p-value.
    """
    sc, nc = v.successes_trials(successes_control, trials_control, "successes_control", "trials_control")
    st, nt = v.successes_trials(successes_treatment, trials_treatment, "successes_treatment", "trials_treatment")
    a = v.open_unit(alpha, "alpha")
    pc, pt = sc / nc, st / nt
    pooled = (sc + st) / (nc + nt)
    if pooled in (0.0, 1.0):
        p_value = 1.0  # no variation in either arm: no evidence of a difference
    else:
        p_value = float(proportions_ztest([st, sc], [nt, nc], value=0.0, alternative="two-sided")[1])
    low, high = confint_proportions_2indep(st, nt, sc, nc, method="newcomb", compare="diff", alpha=a)
    if sc > 0:
        r_low, r_high = confint_proportions_2indep(st, nt, sc, nc, method="log-adjusted", compare="ratio", alpha=a)
        rel, rel_low, rel_high = pt / pc - 1, float(r_low) - 1, float(r_high) - 1
    else:
        rel = rel_low = rel_high = None
    return difference_result(
        metric,
        "two_proportion_ztest",
        pc,
        pt,
        (low, high),
        p_value,
        a,
        nc,
        nt,
        relative_lift=rel,
        relative_ci_low=rel_low,
        relative_ci_high=rel_high,
    )


# ----------------------------------------------------------------------------------------- means


def welch_ttest_from_stats(
    mean_control: float,
    std_control: float,
    n_control: int,
    mean_treatment: float,
    std_treatment: float,
    n_treatment: int,
    *,
    alpha: float = 0.05,
    metric: str = "mean",
) -> MetricResult:
    """Welch's unequal-variance t-test from per-arm mean, sample std (ddof=1) and count (SQL aggregates).

    p-value: scipy ``ttest_ind_from_stats(equal_var=False)``; interval: ``diff ± t(df) * se`` with the
    Welch-Satterthwaite df, which is what scipy's ``ttest_ind(...).confidence_interval()`` returns.
    Relative lift uses a delta-method normal interval.
    """
    nc = v.count(n_control, "n_control")
    nt = v.count(n_treatment, "n_treatment")
    if nc < 2 or nt < 2:
        raise ValueError("n_control and n_treatment must both be at least 2")
    for name, x in (("mean_control", mean_control), ("mean_treatment", mean_treatment)):
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite")
    for name, x in (("std_control", std_control), ("std_treatment", std_treatment)):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be finite and non-negative")
    a = v.open_unit(alpha, "alpha")
    vc, vt = std_control**2 / nc, std_treatment**2 / nt
    se = math.sqrt(vc + vt)
    diff = mean_treatment - mean_control
    if se == 0:  # both arms constant: the difference is known exactly
        p_value, low, high = (1.0 if diff == 0 else 0.0), diff, diff
    else:
        df = (vc + vt) ** 2 / (vc**2 / (nc - 1) + vt**2 / (nt - 1))
        res = stats.ttest_ind_from_stats(
            mean_treatment, std_treatment, nt, mean_control, std_control, nc, equal_var=False
        )
        p_value = float(res.pvalue)
        half = float(stats.t.ppf(1 - a / 2, df)) * se
        low, high = diff - half, diff + half
    rel, rel_low, rel_high = ratio_lift_ci(mean_treatment, math.sqrt(vt), mean_control, math.sqrt(vc), a)
    return difference_result(
        metric,
        "welch_ttest",
        float(mean_control),
        float(mean_treatment),
        (low, high),
        p_value,
        a,
        nc,
        nt,
        relative_lift=rel,
        relative_ci_low=rel_low,
        relative_ci_high=rel_high,
    )


def welch_ttest(control: ArrayLike, treatment: ArrayLike, *, alpha: float = 0.05, metric: str = "mean") -> MetricResult:
    """Welch's t-test on raw samples (see :func:`welch_ttest_from_stats`)."""
    c = v.sample(control, "control", min_size=2)
    t = v.sample(treatment, "treatment", min_size=2)
    return welch_ttest_from_stats(
        float(c.mean()), float(c.std(ddof=1)), c.size, float(t.mean()), float(t.std(ddof=1)), t.size,
        alpha=alpha, metric=metric,
    )  # fmt: skip


def mann_whitney(
    control: ArrayLike, treatment: ArrayLike, *, alpha: float = 0.05, metric: str = "rank"
) -> MetricResult:
    """Mann-Whitney U test for skewed metrics, with the probability of superiority as the effect.

    ``estimate = P(T > C) + P(T = C) / 2 = U_treatment / (n_t * n_c)`` (null value 0.5) with a
    DeLong (placement-value) normal interval; p-value from scipy ``mannwhitneyu`` (exact for small
    samples without ties, otherwise normal approximation with tie and continuity corrections).
    ``control_value``/``treatment_value`` are the medians. The test is about stochastic ordering,
    not the mean: for a difference in a quantile use :func:`bootstrap_quantile_difference`.
    """
    c = v.sample(control, "control", min_size=2)
    t = v.sample(treatment, "treatment", min_size=2)
    a = v.open_unit(alpha, "alpha")
    res = stats.mannwhitneyu(t, c, alternative="two-sided", method="auto")
    n, m = t.size, c.size
    cs, ts = np.sort(c), np.sort(t)
    below_c = np.searchsorted(cs, t, side="left")
    ties_c = np.searchsorted(cs, t, side="right") - below_c
    v10 = (below_c + 0.5 * ties_c) / m  # per treatment unit: share of control it beats
    above_t = n - np.searchsorted(ts, c, side="right")
    ties_t = np.searchsorted(ts, c, side="right") - np.searchsorted(ts, c, side="left")
    v01 = (above_t + 0.5 * ties_t) / n  # per control unit: share of treatment that beats it
    auc = float(res.statistic) / (n * m)
    se = math.sqrt(v10.var(ddof=1) / n + v01.var(ddof=1) / m)
    half = float(stats.norm.ppf(1 - a / 2)) * se
    p_value = float(res.pvalue)
    return MetricResult(
        metric=metric,
        method="mann_whitney_u",
        control_value=float(np.median(c)),
        treatment_value=float(np.median(t)),
        estimate=auc,
        ci_low=max(0.0, auc - half),
        ci_high=min(1.0, auc + half),
        p_value=p_value,
        decision=decide(p_value, a, auc, 0.5),
        alpha=a,
        n_control=m,
        n_treatment=n,
        null_value=0.5,
    )


# ---------------------------------------------------------------------------------- bootstrap


_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def _bootstrap_quantiles(
    x: NDArray[np.float64], q: float, n_resamples: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // x.size)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        k = min(rows, n_resamples - start)
        idx = rng.integers(0, x.size, size=(k, x.size))
        out[start : start + k] = np.quantile(x[idx], q, axis=1)
    return out


def bootstrap_quantile_difference(
    control: ArrayLike,
    treatment: ArrayLike,
    *,
    quantile: float = 0.95,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: Seed = 0,
    metric: str | None = None,
) -> MetricResult:
    """Percentile-bootstrap interval for ``quantile(treatment) - quantile(control)`` (e.g. latency p95).

    Each arm is resampled independently (units are independent across arms), vectorised in chunks
    of about 4 M values, with a seeded ``numpy.random.Generator``; quantiles use numpy's default
    linear interpolation. The p-value inverts the percentile interval,
    ``2 * min(P*(diff <= 0), P*(diff >= 0))`` with a +1 correction, so it agrees with the interval
    and has resolution about ``2 / n_resamples``. The percentile bootstrap of a tail quantile needs
    a few hundred observations beyond it (n >= ~2000 per arm for p95) to be accurate.
    """
    c = v.sample(control, "control", min_size=2)
    t = v.sample(treatment, "treatment", min_size=2)
    q = v.open_unit(quantile, "quantile")
    b = v.positive_int(n_resamples, "n_resamples")
    if b < 100:
        raise ValueError("n_resamples must be at least 100")
    a = v.open_unit(alpha, "alpha")
    rng = rng_from(seed)
    qc, qt = float(np.quantile(c, q)), float(np.quantile(t, q))
    boot = _bootstrap_quantiles(t, q, b, rng) - _bootstrap_quantiles(c, q, b, rng)
    low, high = (float(x) for x in np.quantile(boot, [a / 2, 1 - a / 2]))
    le, ge = int(np.sum(boot <= 0)), int(np.sum(boot >= 0))
    p_value = min(1.0, 2 * min(le + 1, ge + 1) / (b + 1))
    return difference_result(
        metric or f"p{round(q * 100, 4):g}",
        "bootstrap_quantile_difference",
        qc,
        qt,
        (low, high),
        p_value,
        a,
        c.size,
        t.size,
        relative_lift=(qt - qc) / qc if qc != 0 else None,
    )


# ---------------------------------------------------------------------------------------- SRM


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio-mismatch check: chi-square goodness of fit of assignment counts to the planned weights."""

    statistic: float
    p_value: float
    mismatch: bool
    threshold: float
    observed_counts: tuple[int, ...]
    observed_fractions: tuple[float, ...]
    expected_fractions: tuple[float, ...]


def sample_ratio_mismatch(
    observed_counts: Sequence[int] | ArrayLike,
    expected_weights: Sequence[float] | ArrayLike,
    *,
    threshold: float = 0.001,
) -> SRMResult:
    """Flag a sample ratio mismatch when the goodness-of-fit p-value is below ``threshold`` (0.001).

    The strict threshold is usual because SRM is checked on every experiment, often repeatedly, and
    a mismatch invalidates the experiment rather than merely weakening it. A variant with weight 0
    that received units is a mismatch by definition (p = 0).
    """
    obs = v.counts(observed_counts, "observed_counts")
    w = v.weights(expected_weights, "expected_weights")
    if obs.size != w.size:
        raise ValueError(f"observed_counts and expected_weights must have the same length, got {obs.size} and {w.size}")
    if obs.size < 2:
        raise ValueError("observed_counts must have at least two variants")
    thr = v.open_unit(threshold, "threshold")
    total = int(obs.sum())
    if np.any((w == 0) & (obs > 0)):
        statistic, p_value = math.inf, 0.0
    else:
        keep = w > 0
        if keep.sum() < 2:
            statistic, p_value = 0.0, 1.0
        else:
            res = stats.chisquare(obs[keep], f_exp=w[keep] * total)
            statistic, p_value = float(res.statistic), float(res.pvalue)
    return SRMResult(
        statistic=statistic,
        p_value=p_value,
        mismatch=p_value < thr,
        threshold=thr,
        observed_counts=tuple(int(x) for x in obs),
        observed_fractions=tuple(float(x) for x in obs / total),
        expected_fractions=tuple(float(x) for x in w),
    )


# --------------------------------------------------------------------------------------- CUPED


@dataclass(frozen=True)
class VariantMoments:
    """Per-arm sufficient statistics of a metric ``y`` and its pre-period covariate ``x``.

    ClickHouse computes them in one pass: ``count()``, ``avg(y)``, ``avg(x)``, ``varSamp(y)``,
    ``varSamp(x)``, ``covarSamp(x, y)`` (sample moments, ddof = 1).
    """

    n: int
    mean_y: float
    mean_x: float
    var_y: float
    var_x: float
    cov_xy: float

    def __post_init__(self) -> None:
        if v.count(self.n, "n") < 2:
            raise ValueError("n must be at least 2")
        for name in ("mean_y", "mean_x", "var_y", "var_x", "cov_xy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.var_y < 0 or self.var_x < 0:
            raise ValueError("var_y and var_x must be non-negative")

    @classmethod
    def from_samples(cls, y: ArrayLike, x: ArrayLike) -> VariantMoments:
        """Moments of paired samples (metric, pre-period covariate) of one arm."""
        ya = v.sample(y, "y", min_size=2)
        xa = v.sample(x, "x", min_size=2)
        if ya.size != xa.size:
            raise ValueError(f"y and x must have the same length, got {ya.size} and {xa.size}")
        cov = np.cov(xa, ya, ddof=1)
        return cls(ya.size, float(ya.mean()), float(xa.mean()), float(cov[1, 1]), float(cov[0, 0]), float(cov[0, 1]))


def cuped_from_moments(
    control: VariantMoments, treatment: VariantMoments, *, alpha: float = 0.05, metric: str = "mean"
) -> MetricResult:
    """CUPED-adjusted difference in means (Deng et al. 2013) from per-arm moments.

    ``theta = pooled within-arm cov(x, y) / pooled within-arm var(x)``, pooled across both arms with
    weights ``n - 1``, so it is the same for both arms and unaffected by the treatment effect; the
    adjusted metric is ``y - theta * (x - mean(x))``. The estimate equals the treatment coefficient of
    the ANCOVA regression ``y ~ treatment + x``. Its interval is Welch's with the adjusted variances
    (theta treated as known; its estimation error is O(1/n)). ``variance_reduction`` is
    ``1 - Var(adjusted diff) / Var(unadjusted diff)``, about ``corr(x, y)**2``.
    """
    a = v.open_unit(alpha, "alpha")
    dof = (control.n - 1, treatment.n - 1)
    var_x = dof[0] * control.var_x + dof[1] * treatment.var_x
    theta = (dof[0] * control.cov_xy + dof[1] * treatment.cov_xy) / var_x if var_x > 0 else 0.0
    mean_x = (control.n * control.mean_x + treatment.n * treatment.mean_x) / (control.n + treatment.n)

    def adjusted(m: VariantMoments) -> tuple[float, float]:
        var = max(m.var_y - 2 * theta * m.cov_xy + theta**2 * m.var_x, 0.0)
        return m.mean_y - theta * (m.mean_x - mean_x), var / m.n

    mc, vc = adjusted(control)
    mt, vt = adjusted(treatment)
    diff = mt - mc
    se = math.sqrt(vc + vt)
    raw_var = control.var_y / control.n + treatment.var_y / treatment.n
    if se == 0:
        p_value, low, high = (1.0 if diff == 0 else 0.0), diff, diff
    else:
        df = (vc + vt) ** 2 / (vc**2 / dof[0] + vt**2 / dof[1])
        t_stat = diff / se
        p_value = float(2 * stats.t.sf(abs(t_stat), df))
        half = float(stats.t.ppf(1 - a / 2, df)) * se
        low, high = diff - half, diff + half
    rel, rel_low, rel_high = ratio_lift_ci(mt, math.sqrt(vt), mc, math.sqrt(vc), a)
    return difference_result(
        metric,
        "cuped_welch",
        mc,
        mt,
        (low, high),
        p_value,
        a,
        control.n,
        treatment.n,
        relative_lift=rel,
        relative_ci_low=rel_low,
        relative_ci_high=rel_high,
        variance_reduction=1 - (vc + vt) / raw_var if raw_var > 0 else 0.0,
    )


def cuped(
    y_control: ArrayLike,
    x_control: ArrayLike,
    y_treatment: ArrayLike,
    x_treatment: ArrayLike,
    *,
    alpha: float = 0.05,
    metric: str = "mean",
) -> MetricResult:
    """CUPED on raw samples: metric ``y`` and pre-period covariate ``x`` per unit, per arm."""
    return cuped_from_moments(
        VariantMoments.from_samples(y_control, x_control),
        VariantMoments.from_samples(y_treatment, x_treatment),
        alpha=alpha,
        metric=metric,
    )


# ------------------------------------------------------------------------------ multiple testing

CorrectionMethod = Literal["holm", "fdr_bh"]


@dataclass(frozen=True)
class MultipleTestingResult:
    """Adjusted p-values and rejections (statsmodels ``multipletests``)."""

    method: CorrectionMethod
    alpha: float
    adjusted_p_values: tuple[float, ...]
    reject: tuple[bool, ...]


def adjust_p_values(
    p_values: Sequence[float] | ArrayLike, *, method: CorrectionMethod = "holm", alpha: float = 0.05
) -> MultipleTestingResult:
    """Holm (family-wise error) or Benjamini-Hochberg (false discovery rate) adjustment."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("p_values must be a non-empty one-dimensional sequence")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p_values must lie in [0, 1]")
    if method not in ("holm", "fdr_bh"):
        raise ValueError(f"method must be 'holm' or 'fdr_bh', got {method!r}")
    a = v.open_unit(alpha, "alpha")
    reject, adjusted, _, _ = multipletests(p, alpha=a, method=method)
    return MultipleTestingResult(method, a, tuple(float(x) for x in adjusted), tuple(bool(x) for x in reject))


def correct_metric_results(
    results: Sequence[MetricResult], *, method: CorrectionMethod = "holm", alpha: float = 0.05
) -> tuple[MetricResult, ...]:
    """Replace each fixed-horizon result's p-value by its adjusted value and re-decide at ``alpha``.

    Intervals are left unadjusted (marginal ``1 - alpha`` intervals), so a result may be
    non-significant after correction while its interval excludes 0.
    """
    if not results:
        raise ValueError("results must not be empty")
    p_values = [r.p_value for r in results if r.p_value is not None]
    if len(p_values) != len(results):
        raise ValueError("results must all have a fixed-horizon p_value (sequential results are not corrected here)")
    adj = adjust_p_values(p_values, method=method, alpha=alpha)
    return tuple(
        replace(r, p_value=p, alpha=adj.alpha, decision=decide(p, adj.alpha, r.estimate, r.null_value))
        for r, p in zip(results, adj.adjusted_p_values, strict=True)
    )
