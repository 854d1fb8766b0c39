"""Feature drift statistics: PSI, Kolmogorov-Smirnov, Wasserstein, Jensen-Shannon, chi-square, proportions.

Each check exists in two forms: on raw reference/current samples (convenient, exact), and against
a cached :class:`~.profiles.NumericProfile` / :class:`~.profiles.CategoricalProfile` with current
*bin counts* (what a ClickHouse ``GROUP BY`` returns) or a current sample. Results are frozen
dataclasses with a ``status`` of ``"ok"``, ``"warn"`` or ``"alert"`` decided by
:class:`DriftThresholds`.

Why two kinds of threshold: PSI, Jensen-Shannon and Wasserstein are effect sizes and are compared
with fixed cut-offs. KS, chi-square and the two-proportion test give p-values; with the millions of
rows a serving mesh sees, any negligible difference becomes "significant", so these tests also get
an effect-size level (KS statistic, chi-square divergence, absolute rate difference) and their
status is the lower of the two levels. Several checks on several features are several tests: the
p-value cut-offs are deliberately small (1 % / 0.1 %).

Sampling noise: PSI and JS of a small window are biased upwards (see
``PSIResult.expected_under_no_drift``); they are effect sizes, not tests, so compare windows of at
least a few thousand rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from scipy.spatial.distance import jensenshannon
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from . import _validation as v
from .profiles import DEFAULT_N_BINS, CategoricalProfile, NumericProfile, build_numeric_profile

Status = Literal["ok", "warn", "alert"]
_SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "alert": 2}

DEFAULT_EPSILON = 1e-4
"""Floor for bin proportions in PSI (0.01 %): keeps ``ln(c/r)`` finite when a bin is empty on one side."""

JS_BASE = 2.0
"""Logarithm base of the Jensen-Shannon divergence: base 2 bounds it to [0, 1] (bits)."""

OTHER_CATEGORY = "__other__"


def worst_status(statuses: Iterable[Status]) -> Status:
    """The most severe of ``statuses`` (``"ok"`` for none)."""
    worst: Status = "ok"
    for s in statuses:
        if s not in _SEVERITY:
            raise ValueError(f"statuses contains an unknown status {s!r}")
        if _SEVERITY[s] > _SEVERITY[worst]:
            worst = s
    return worst


@dataclass(frozen=True)
class DriftThresholds:
    """Cut-offs that turn drift statistics into a status.

    Defaults and why:

    * PSI 0.1 / 0.2: the industry convention (0.1-0.2 moderate shift, > 0.2 major shift).
    * Jensen-Shannon divergence (base 2) 0.018 / 0.036: for small shifts JS ≈ PSI / (8 ln 2), so these
      are the PSI cut-offs expressed as JS divergence.
    * Wasserstein-1 in units of the reference standard deviation 0.3 / 0.45: a normal location shift
      of ``d`` standard deviations has PSI (Jeffreys divergence) ``d**2``, so sqrt(0.1) and sqrt(0.2).
    * p-value tests (KS, chi-square, two proportions): the p-value says whether a difference is real,
      the effect size whether it matters, and the status is the lower of the two levels. p-value
      levels: warn below 0.01, alert below 0.001. Effect levels: KS statistic 0.125 / 0.175 (the KS
      distance ``2 Phi(d/2) - 1`` of the same PSI-equivalent normal shifts d = sqrt(0.1), sqrt(0.2));
      for chi-square the divergence ``chi2 * (1/n_ref + 1/n_cur)`` (Cohen's w squared, sample-size
      free, ≈ PSI for small changes) against the PSI cut-offs; absolute rate difference 0 / 0
      (refusal rates are small, so any significant change counts).

    So on a pure location shift the numeric checks agree; they differ in which shapes of change
    they see.
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    js_warn: float = 0.018
    js_alert: float = 0.036
    wasserstein_warn: float = 0.3
    wasserstein_alert: float = 0.45
    alpha_warn: float = 0.01
    alpha_alert: float = 0.001
    ks_statistic_warn: float = 0.125
    ks_statistic_alert: float = 0.175
    proportion_difference_warn: float = 0.0
    proportion_difference_alert: float = 0.0

    def __post_init__(self) -> None:
        for prefix in ("psi", "js", "wasserstein", "ks_statistic", "proportion_difference"):
            warn, alert = f"{prefix}_warn", f"{prefix}_alert"
            w, a = getattr(self, warn), getattr(self, alert)
            if not (0 <= w <= a) or not math.isfinite(a):
                raise ValueError(f"{warn} and {alert} must satisfy 0 <= {warn} <= {alert} < inf, got {w}, {a}")
        v.open_unit(self.alpha_warn, "alpha_warn")
        v.open_unit(self.alpha_alert, "alpha_alert")
        if self.alpha_alert > self.alpha_warn:
            raise ValueError("alpha_alert must not exceed alpha_warn")


DEFAULT_THRESHOLDS = DriftThresholds()


def _level(value: float, warn: float, alert: float) -> Status:
    if value >= alert:
        return "alert"
    return "warn" if value >= warn else "ok"


def _test_level(p_value: float, effect: float, effect_warn: float, effect_alert: float, th: DriftThresholds) -> Status:
    """The lower of the significance level and the effect-size level."""
    by_p: Status = "alert" if p_value < th.alpha_alert else "warn" if p_value < th.alpha_warn else "ok"
    by_effect = _level(effect, effect_warn, effect_alert)
    return by_p if _SEVERITY[by_p] <= _SEVERITY[by_effect] else by_effect


# --------------------------------------------------------------------------------------------- PSI


@dataclass(frozen=True)
class PSIResult:
    """Population stability index ``sum((c - r) * ln(c / r))`` over bins.

    ``expected_under_no_drift`` is the approximate mean PSI from sampling noise alone,
    ``(bins - 1) * (1/n_reference + 1/n_current)``: compare with it before reading much into a small
    window's PSI.
    """

    psi: float
    status: Status
    contributions: tuple[float, ...]
    reference_proportions: tuple[float, ...]
    current_proportions: tuple[float, ...]
    n_reference: int
    n_current: int
    epsilon: float
    expected_under_no_drift: float


def _floored(counts: NDArray[np.int64], epsilon: float) -> NDArray[np.float64]:
    p = counts / counts.sum()
    p = np.maximum(p, epsilon)
    return p / p.sum()


def psi_from_counts(
    reference_counts: ArrayLike,
    current_counts: ArrayLike,
    *,
    epsilon: float = DEFAULT_EPSILON,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> PSIResult:
    """PSI from counts per bin (same bins on both sides, e.g. reference-quantile bins).

    Empty bins: both proportion vectors are floored at ``epsilon`` and renormalised, so a bin empty
    on one side contributes about ``p * ln(p / epsilon)`` (0.31 for a 5 % bin with the default
    1e-4): a bin that empties out still raises PSI, and a bin empty on both sides adds nothing.
    """
    ref = v.counts(reference_counts, "reference_counts")
    cur = v.counts(current_counts, "current_counts")
    if ref.size != cur.size:
        raise ValueError(
            f"reference_counts and current_counts must have the same length, got {ref.size} and {cur.size}"
        )
    eps = v.open_unit(epsilon, "epsilon")
    r = _floored(ref, eps)
    c = _floored(cur, eps)
    contrib = (c - r) * np.log(c / r)
    value = float(contrib.sum())
    n_ref, n_cur = int(ref.sum()), int(cur.sum())
    return PSIResult(
        psi=value,
        status=_level(value, thresholds.psi_warn, thresholds.psi_alert),
        contributions=tuple(float(x) for x in contrib),
        reference_proportions=tuple(float(x) for x in ref / n_ref),
        current_proportions=tuple(float(x) for x in cur / n_cur),
        n_reference=n_ref,
        n_current=n_cur,
        epsilon=eps,
        expected_under_no_drift=float((ref.size - 1) * (1 / n_ref + 1 / n_cur)),
    )


def _profile_counts(profile: NumericProfile, current_counts: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    cur = v.counts(current_counts, "current_counts")
    if cur.size != profile.n_bins:
        raise ValueError(f"current_counts must have one count per reference bin ({profile.n_bins}), got {cur.size}")
    return np.asarray(profile.counts, dtype=np.int64), cur


def psi_from_profile(
    profile: NumericProfile,
    current_counts: ArrayLike,
    *,
    epsilon: float = DEFAULT_EPSILON,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> PSIResult:
    """PSI of current counts per reference bin (:meth:`NumericProfile.bin_counts` or SQL) against a profile."""
    ref, cur = _profile_counts(profile, current_counts)
    return psi_from_counts(ref, cur, epsilon=epsilon, thresholds=thresholds)


def psi(
    reference: ArrayLike,
    current: ArrayLike,
    *,
    n_bins: int = DEFAULT_N_BINS,
    epsilon: float = DEFAULT_EPSILON,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> PSIResult:
    """PSI of two raw samples, with ``n_bins`` bins at the reference quantiles."""
    profile = build_numeric_profile(v.sample(reference, "reference"), n_bins=n_bins, max_points=1)
    return psi_from_profile(
        profile, profile.bin_counts(v.sample(current, "current")), epsilon=epsilon, thresholds=thresholds
    )


# ------------------------------------------------------------------------------------ Jensen-Shannon


@dataclass(frozen=True)
class JensenShannonResult:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of binned distributions; ``distance`` is its square root."""

    divergence: float
    distance: float
    base: float
    status: Status
    n_reference: int
    n_current: int


def js_from_counts(
    reference_counts: ArrayLike, current_counts: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> JensenShannonResult:
    """JS divergence between two histograms over the same bins; empty bins need no epsilon."""
    ref = v.counts(reference_counts, "reference_counts")
    cur = v.counts(current_counts, "current_counts")
    if ref.size != cur.size:
        raise ValueError(
            f"reference_counts and current_counts must have the same length, got {ref.size} and {cur.size}"
        )
    distance = float(jensenshannon(ref / ref.sum(), cur / cur.sum(), base=JS_BASE))
    divergence = distance**2
    return JensenShannonResult(
        divergence=divergence,
        distance=distance,
        base=JS_BASE,
        status=_level(divergence, thresholds.js_warn, thresholds.js_alert),
        n_reference=int(ref.sum()),
        n_current=int(cur.sum()),
    )


def js_from_profile(
    profile: NumericProfile, current_counts: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> JensenShannonResult:
    """JS divergence of current counts per reference bin against a profile."""
    ref, cur = _profile_counts(profile, current_counts)
    return js_from_counts(ref, cur, thresholds=thresholds)


def jensen_shannon(
    reference: ArrayLike,
    current: ArrayLike,
    *,
    n_bins: int = DEFAULT_N_BINS,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> JensenShannonResult:
    """JS divergence of two raw samples binned at the reference quantiles."""
    profile = build_numeric_profile(v.sample(reference, "reference"), n_bins=n_bins, max_points=1)
    return js_from_profile(profile, profile.bin_counts(v.sample(current, "current")), thresholds=thresholds)


# ------------------------------------------------------------------------------- Kolmogorov-Smirnov


@dataclass(frozen=True)
class KSResult:
    """Two-sample Kolmogorov-Smirnov test; ``max_statistic_error`` is 0 when computed from full samples."""

    statistic: float
    p_value: float
    status: Status
    exact: bool
    max_statistic_error: float
    n_reference: int
    n_current: int


def ks_test(reference: ArrayLike, current: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS) -> KSResult:
    """scipy's two-sample KS test (exact p-value for small samples, asymptotic otherwise)."""
    ref = v.sample(reference, "reference")
    cur = v.sample(current, "current")
    res = stats.ks_2samp(ref, cur, alternative="two-sided", method="auto")
    d, p = float(res.statistic), float(res.pvalue)
    return KSResult(
        d,
        p,
        _test_level(p, d, thresholds.ks_statistic_warn, thresholds.ks_statistic_alert, thresholds),
        True,
        0.0,
        ref.size,
        cur.size,
    )


def ks_from_profile(
    profile: NumericProfile, current: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> KSResult:
    """KS test of a current sample against a profile.

    Exact (scipy) when the profile stores the whole reference. Otherwise the statistic comes from the
    quantile sketch (within ``1/(2K)`` of the exact one) and the p-value from Smirnov's asymptotic
    distribution ``kstwo(round(n*m/(n+m)))`` with the true reference size ``n``, as scipy does for
    large samples. The statistic error matters for the p-value only when ``m`` is very large
    (``sqrt(m) / (2K)`` not small); raise ``max_points`` then.
    """
    cur = v.sample(current, "current")
    points = np.asarray(profile.quantile_points, dtype=np.float64)
    if profile.exact:
        return ks_test(points, cur, thresholds=thresholds)
    d = float(stats.ks_2samp(points, cur, method="asymp").statistic)
    n, m = float(profile.n), float(cur.size)
    en = n * m / (n + m)
    p = float(np.clip(stats.kstwo.sf(d, np.round(en)), 0.0, 1.0))
    err = 0.5 / points.size
    return KSResult(
        d,
        p,
        _test_level(p, d, thresholds.ks_statistic_warn, thresholds.ks_statistic_alert, thresholds),
        False,
        err,
        profile.n,
        cur.size,
    )


# --------------------------------------------------------------------------------------- Wasserstein


@dataclass(frozen=True)
class WassersteinResult:
    """Wasserstein-1 (earth mover's) distance; ``normalized`` divides by the reference standard deviation."""

    distance: float
    normalized: float
    status: Status
    exact: bool
    n_reference: int
    n_current: int


def _wasserstein_result(
    distance: float, ref_std: float, exact: bool, n_ref: int, n_cur: int, th: DriftThresholds
) -> WassersteinResult:
    if ref_std > 0:
        normalized = distance / ref_std
    else:  # constant reference: any movement is infinitely many standard deviations
        normalized = 0.0 if distance == 0 else math.inf
    return WassersteinResult(
        distance, normalized, _level(normalized, th.wasserstein_warn, th.wasserstein_alert), exact, n_ref, n_cur
    )


def wasserstein(
    reference: ArrayLike, current: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> WassersteinResult:
    """scipy's 1-D Wasserstein distance between two samples, scaled by the reference std for the status."""
    ref = v.sample(reference, "reference")
    cur = v.sample(current, "current")
    distance = float(stats.wasserstein_distance(ref, cur))
    std = float(ref.std(ddof=1)) if ref.size > 1 else 0.0
    return _wasserstein_result(distance, std, True, ref.size, cur.size, thresholds)


def wasserstein_from_profile(
    profile: NumericProfile, current: ArrayLike, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> WassersteinResult:
    """Wasserstein distance of a current sample against a profile (exact or quantile-sketch approximation)."""
    cur = v.sample(current, "current")
    distance = float(stats.wasserstein_distance(np.asarray(profile.quantile_points), cur))
    return _wasserstein_result(distance, profile.std, profile.exact, profile.n, cur.size, thresholds)


# ---------------------------------------------------------------------------------------- chi-square


@dataclass(frozen=True)
class ChiSquareResult:
    """Chi-square test of homogeneity (reference vs current) over categories, with effect sizes.

    ``cramers_v = sqrt(chi2 / N)`` is the classic effect size but shrinks when one side is much
    larger (a big reference, a small window); ``divergence = chi2 * (1/n_ref + 1/n_cur)`` equals
    ``sum((p_cur - p_ref)**2 / p_pooled)`` (Cohen's w squared), does not depend on the sample sizes,
    and approximates PSI for small changes, so the status compares it with the PSI cut-offs.
    ``pooled`` lists the categories merged into ``"__other__"`` because the table broke Cochran's rule
    (see :func:`chi_square_from_counts`); ``categories`` is the list actually tested.
    """

    statistic: float
    dof: int
    p_value: float
    cramers_v: float
    divergence: float
    status: Status
    categories: tuple[str, ...]
    pooled: tuple[str, ...]
    n_reference: int
    n_current: int


def _count_mapping(counts: Mapping[str, int], name: str) -> dict[str, int]:
    if not isinstance(counts, Mapping):
        raise ValueError(f"{name} must be a mapping of category -> count")
    out = {str(k): v.count(c, f"{name}[{k!r}]") for k, c in counts.items()}
    if sum(out.values()) <= 0:
        raise ValueError(f"{name} must have a positive total")
    return out


def _cochran_ok(table: NDArray[np.float64], min_expected: float) -> bool:
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    return bool((expected < min_expected).mean() <= 0.2 and (expected >= 1).all())


def _pool_rare(
    table: NDArray[np.float64], cats: list[str], min_expected: float
) -> tuple[NDArray[np.float64], list[str], tuple[str, ...]]:
    """Pool rare categories into ``"__other__"`` when the table breaks Cochran's rule (see caller)."""
    if table.shape[1] <= 2 or _cochran_ok(table, min_expected):
        return table, cats, ()
    rows, total = table.sum(axis=1), table.sum()
    min_expected_of = {c: rows.min() * table[:, i].sum() / total for i, c in enumerate(cats)}
    by_size = sorted(cats, key=lambda c: (min_expected_of[c], c))
    pooled = [c for c in by_size if min_expected_of[c] < min_expected]
    rest = [c for c in by_size if c not in pooled]
    while rest and (len(pooled) < 2 or sum(min_expected_of[c] for c in pooled) < 1):
        pooled.append(rest.pop(0))  # the pooled column itself needs expected counts >= 1
    if not rest:  # everything would be pooled: leave the table as it is
        return table, cats, ()
    index = {c: i for i, c in enumerate(cats)}
    keep = sorted(rest)
    other = table[:, [index[c] for c in pooled]].sum(axis=1, keepdims=True)
    new_table = np.hstack([table[:, [index[c] for c in keep]], other])
    return new_table, [*keep, OTHER_CATEGORY], tuple(sorted(pooled))


def chi_square_from_counts(
    reference_counts: Mapping[str, int],
    current_counts: Mapping[str, int],
    *,
    min_expected: float = 5.0,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> ChiSquareResult:
    """Chi-square homogeneity test on the 2 x K table of category counts.

    Categories missing on one side count 0 there (a brand-new category is drift; its expected
    counts come from its column total, which is positive). The chi-square approximation needs
    Cochran's rule: at most 20 % of expected counts below ``min_expected`` (5) and none below 1.
    When the table breaks it, every category with an expected count below ``min_expected`` is pooled
    into ``"__other__"`` (with the next rarest ones if needed so that the pooled column has at least
    two categories and expected counts >= 1); pooling keeps the test valid under no drift.
    No Yates correction (scipy's ``correction=False``).
    """
    ref = _count_mapping(reference_counts, "reference_counts")
    cur = _count_mapping(current_counts, "current_counts")
    if min_expected < 0 or not math.isfinite(min_expected):
        raise ValueError("min_expected must be a finite number >= 0")
    cats = sorted(set(ref) | set(cur))
    table = np.array([[ref.get(c, 0) for c in cats], [cur.get(c, 0) for c in cats]], dtype=np.float64)
    keep = table.sum(axis=0) > 0
    table = table[:, keep]
    cats = [c for c, k in zip(cats, keep, strict=True) if k]
    n_ref, n_cur = int(table[0].sum()), int(table[1].sum())
    total = n_ref + n_cur

    table, cats, pooled = _pool_rare(table, cats, min_expected)

    if table.shape[1] < 2:
        statistic, p_value, dof = 0.0, 1.0, 0
    else:
        res = stats.chi2_contingency(table, correction=False)
        statistic, p_value, dof = float(res.statistic), float(res.pvalue), int(res.dof)
    cramers_v = math.sqrt(statistic / total)  # min(rows, cols) - 1 == 1 for a 2 x K table
    divergence = statistic * (1 / n_ref + 1 / n_cur)
    return ChiSquareResult(
        statistic=statistic,
        dof=dof,
        p_value=p_value,
        cramers_v=cramers_v,
        divergence=divergence,
        status=_test_level(p_value, divergence, thresholds.psi_warn, thresholds.psi_alert, thresholds),
        categories=tuple(cats),
        pooled=pooled,
        n_reference=n_ref,
        n_current=n_cur,
    )


def chi_square_from_profile(
    profile: CategoricalProfile,
    current_counts: Mapping[str, int],
    *,
    min_expected: float = 5.0,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> ChiSquareResult:
    """Chi-square test of current category counts (e.g. from SQL ``GROUP BY``) against a profile."""
    return chi_square_from_counts(profile.counts, current_counts, min_expected=min_expected, thresholds=thresholds)


def chi_square_categorical(
    reference: Iterable[object],
    current: Iterable[object],
    *,
    min_expected: float = 5.0,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> ChiSquareResult:
    """Chi-square test on two raw samples of labels."""
    ref = Counter(str(x) for x in reference)
    cur = Counter(str(x) for x in current)
    if not ref:
        raise ValueError("reference must not be empty")
    if not cur:
        raise ValueError("current must not be empty")
    return chi_square_from_counts(ref, cur, min_expected=min_expected, thresholds=thresholds)


def category_psi(
    reference_counts: Mapping[str, int],
    current_counts: Mapping[str, int],
    *,
    epsilon: float = DEFAULT_EPSILON,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> PSIResult:
    """PSI over categories (each category is a bin; categories missing on one side get the epsilon floor)."""
    ref = _count_mapping(reference_counts, "reference_counts")
    cur = _count_mapping(current_counts, "current_counts")
    cats = sorted(set(ref) | set(cur))
    return psi_from_counts(
        [ref.get(c, 0) for c in cats], [cur.get(c, 0) for c in cats], epsilon=epsilon, thresholds=thresholds
    )


# ------------------------------------------------------------------------------------- proportions


@dataclass(frozen=True)
class ProportionDriftResult:
    """Change of a rate (e.g. LLM refusal rate) from reference to current.

    ``p_value`` is the pooled two-proportion z-test (statsmodels ``proportions_ztest``); the interval
    for ``difference = current - reference`` is Newcombe's hybrid score interval, which keeps its
    coverage for rare events where the Wald interval does not.
    """

    reference_rate: float
    current_rate: float
    difference: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    status: Status
    n_reference: int
    n_current: int


def two_proportion_drift(
    reference_successes: int,
    reference_total: int,
    current_successes: int,
    current_total: int,
    *,
    confidence: float = 0.95,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> ProportionDriftResult:
    """Two-proportion z-test and interval for the change of a rate between reference and current."""
    rs, rn = v.successes_trials(reference_successes, reference_total, "reference_successes", "reference_total")
    cs, cn = v.successes_trials(current_successes, current_total, "current_successes", "current_total")
    conf = v.open_unit(confidence, "confidence")
    pooled = (rs + cs) / (rn + cn)
    if pooled in (0.0, 1.0):  # no variation at all: the z statistic is 0/0, and there is no evidence of change
        z, p = 0.0, 1.0
    else:
        z_raw, p_raw = proportions_ztest([cs, rs], [cn, rn], value=0.0, alternative="two-sided")
        z, p = float(z_raw), float(p_raw)
    low, high = confint_proportions_2indep(cs, cn, rs, rn, method="newcomb", compare="diff", alpha=1 - conf)
    diff = cs / cn - rs / rn
    return ProportionDriftResult(
        reference_rate=rs / rn,
        current_rate=cs / cn,
        difference=diff,
        ci_low=float(low),
        ci_high=float(high),
        z=z,
        p_value=p,
        status=_test_level(
            p, abs(diff), thresholds.proportion_difference_warn, thresholds.proportion_difference_alert, thresholds
        ),
        n_reference=rn,
        n_current=cn,
    )


# ---------------------------------------------------------------------------------- feature reports


@dataclass(frozen=True)
class NumericDriftReport:
    """All numeric drift checks of one feature; KS and Wasserstein need a current sample, not just counts."""

    psi: PSIResult
    jensen_shannon: JensenShannonResult
    ks: KSResult | None
    wasserstein: WassersteinResult | None
    status: Status


def numeric_drift(
    profile: NumericProfile,
    *,
    values: ArrayLike | None = None,
    bin_counts: ArrayLike | None = None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> NumericDriftReport:
    """Run PSI and JS (from bin counts) plus KS and Wasserstein (when a current sample is given).

    Pass ``values`` (a current sample) or ``bin_counts`` (counts per reference bin from SQL), or both
    when SQL supplies the full-window counts and a sample for the distribution tests.
    """
    sample_ = v.sample(values, "values") if values is not None else None
    if bin_counts is not None:
        counts_: ArrayLike = bin_counts
    elif sample_ is not None:
        counts_ = profile.bin_counts(sample_)
    else:
        raise ValueError("values or bin_counts must be given")
    p = psi_from_profile(profile, counts_, thresholds=thresholds)
    js = js_from_profile(profile, counts_, thresholds=thresholds)
    ks = ks_from_profile(profile, sample_, thresholds=thresholds) if sample_ is not None else None
    ws = wasserstein_from_profile(profile, sample_, thresholds=thresholds) if sample_ is not None else None
    status = worst_status([r.status for r in (p, js, ks, ws) if r is not None])
    return NumericDriftReport(p, js, ks, ws, status)


@dataclass(frozen=True)
class CategoricalDriftReport:
    """Chi-square and category PSI of one categorical feature."""

    chi_square: ChiSquareResult
    psi: PSIResult
    status: Status


def categorical_drift(
    profile: CategoricalProfile,
    current_counts: Mapping[str, int] | Sequence[object],
    *,
    min_expected: float = 5.0,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> CategoricalDriftReport:
    """Chi-square and PSI of current category counts (or raw labels) against a categorical profile."""
    counts_ = current_counts if isinstance(current_counts, Mapping) else Counter(str(x) for x in current_counts)
    chi = chi_square_from_profile(profile, counts_, min_expected=min_expected, thresholds=thresholds)
    p = category_psi(profile.counts, counts_, thresholds=thresholds)
    return CategoricalDriftReport(chi, p, worst_status([chi.status, p.status]))
