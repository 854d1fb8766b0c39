"""Always-valid sequential testing: the mixture sequential probability ratio test (mSPRT).

Following Johari, Pekelis & Walsh ("Always valid inference", 2017/2022) and Robbins (1970): let
``D_n`` be the observed difference ``treatment - control`` after look ``n`` and ``V_n`` its
(estimated) variance. With a normal mixing distribution ``N(null_value, tau2)`` over the true
difference, the mixture likelihood ratio against ``H0: difference = null_value`` is

    Lambda_n = sqrt(V_n / (V_n + tau2)) * exp((D_n - null_value)**2 * tau2 / (2 V_n (V_n + tau2)))

For normal increments with known variance ``Lambda`` is a non-negative martingale under H0, so by
Ville's inequality ``P(sup_n Lambda_n >= 1/alpha) <= alpha``: the **always-valid p-value**
``p_n = min(1, min_{k<=n} 1/Lambda_k)`` is non-increasing over looks and can be checked after every
batch (or continuously) without inflating the false-positive rate. Inverting the boundary gives a
**confidence sequence**: ``D_n ± sqrt(V_n (V_n + tau2) / tau2 * (2 ln(1/alpha) + ln((V_n + tau2) / V_n)))``,
intersected over looks; it excludes ``null_value`` exactly when ``p_n <= alpha``.

Approximations: the variance is the plug-in (unpooled) estimate and the difference is treated as
normal (CLT), as in Johari et al.; with Bernoulli metrics that is accurate once each arm has a few
dozen successes. A look with zero estimated variance carries no evidence (``Lambda = 1``). Checking
only at discrete looks makes the test conservative (the realised false-positive rate is below alpha).

Mixing variance ``tau2``: the prior variance of the true effect under the alternative. The test is
valid for any ``tau2`` fixed before the data are seen; it is most powerful for effects near
``tau``. :func:`mixing_variance_for_mde` uses ``tau = MDE`` (the smallest effect worth detecting,
on the difference scale), a data-free default; teams with a history of past effects can instead
set ``tau2`` to their empirical variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _validation as v
from ._common import Decision, MetricResult


def mixing_variance_for_mde(mde: float) -> float:
    """Mixing variance ``tau2 = mde**2`` for an absolute minimum detectable difference ``mde``."""
    if mde == 0 or not math.isfinite(mde):
        raise ValueError("mde must be a non-zero finite number")
    return float(mde) ** 2


def _tau2(mixing_variance: float) -> float:
    return v.positive(mixing_variance, "mixing_variance")


def msprt_log_likelihood_ratio(
    estimate: ArrayLike, variance: ArrayLike, *, mixing_variance: float, null_value: float = 0.0
) -> NDArray[np.float64]:
    """``log Lambda`` of the normal-mixture SPRT, elementwise; 0 where the variance is not positive."""
    d = np.asarray(estimate, dtype=np.float64) - null_value
    var = np.asarray(variance, dtype=np.float64)
    tau2 = _tau2(mixing_variance)
    if np.any(var < 0) or not np.all(np.isfinite(var)):
        raise ValueError("variance must be finite and non-negative")
    if not np.all(np.isfinite(d)):
        raise ValueError("estimate must be finite")
    with np.errstate(divide="ignore", invalid="ignore"):
        llr = 0.5 * np.log(var / (var + tau2)) + d**2 * tau2 / (2 * var * (var + tau2))
    return np.where(var > 0, llr, 0.0)


def always_valid_p_values(
    estimates: ArrayLike, variances: ArrayLike, *, mixing_variance: float, null_value: float = 0.0
) -> NDArray[np.float64]:
    """Always-valid p-values ``min(1, running min of 1/Lambda)`` with looks along the last axis.

    Vectorised: pass arrays of shape ``(experiments, looks)`` to evaluate many experiments at once.
    """
    llr = msprt_log_likelihood_ratio(estimates, variances, mixing_variance=mixing_variance, null_value=null_value)
    p = np.minimum(1.0, np.exp(-llr))
    return np.minimum.accumulate(p, axis=-1)


def confidence_sequence(
    estimates: ArrayLike, variances: ArrayLike, *, mixing_variance: float, alpha: float = 0.05
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Always-valid ``1 - alpha`` confidence sequence (running intersection) with looks along the last axis."""
    d = np.asarray(estimates, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    tau2 = _tau2(mixing_variance)
    a = v.open_unit(alpha, "alpha")
    if np.any(var < 0) or not np.all(np.isfinite(var)):
        raise ValueError("variances must be finite and non-negative")
    half = _cs_half_width(var, tau2, a)
    if d.ndim == 0 and half.ndim == 0:
        return d - half, d + half
    low = np.maximum.accumulate(d - half, axis=-1)
    high = np.minimum.accumulate(d + half, axis=-1)
    return low, high


def _cs_half_width(var: NDArray[np.float64], tau2: float, alpha: float) -> NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.sqrt(var * (var + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((var + tau2) / var)))
    return np.where(var > 0, half, np.inf)


@dataclass(frozen=True)
class SequentialLook:
    """State and outcome of the mSPRT after one look; persist it and pass it to the next :func:`msprt_update`."""

    look: int
    n_control: int
    n_treatment: int
    control_value: float
    treatment_value: float
    estimate: float
    variance: float
    log_likelihood_ratio: float
    always_valid_p_value: float
    ci_low: float
    ci_high: float
    decision: Decision
    alpha: float
    mixing_variance: float

    def to_metric_result(self, metric: str) -> MetricResult:
        """The look as a :class:`MetricResult` (``p_value`` None, ``always_valid_p_value`` set)."""
        return MetricResult(
            metric=metric,
            method="msprt",
            control_value=self.control_value,
            treatment_value=self.treatment_value,
            estimate=self.estimate,
            ci_low=self.ci_low,
            ci_high=self.ci_high,
            p_value=None,
            decision=self.decision,
            alpha=self.alpha,
            n_control=self.n_control,
            n_treatment=self.n_treatment,
            always_valid_p_value=self.always_valid_p_value,
        )


def _decision(p: float, low: float, high: float, estimate: float, alpha: float) -> Decision:
    if p > alpha:
        return "continue"
    if low > 0:
        return "increase"
    if high < 0:
        return "decrease"
    return "increase" if estimate > 0 else "decrease"  # confidence sequence emptied out (misspecification)


def msprt_update(
    previous: SequentialLook | None,
    *,
    n_control: int,
    n_treatment: int,
    control_value: float,
    treatment_value: float,
    variance: float,
    mixing_variance: float,
    alpha: float = 0.05,
) -> SequentialLook:
    """One look of the mSPRT on cumulative data: update the running p-value and confidence sequence.

    ``variance`` is the variance of ``treatment_value - control_value`` (e.g. ``p(1-p)/n`` summed
    over arms for proportions, ``s**2/n`` summed for means). ``alpha`` and ``mixing_variance`` must
    not change between looks.
    """
    a = v.open_unit(alpha, "alpha")
    tau2 = _tau2(mixing_variance)
    if previous is not None and (previous.alpha != a or previous.mixing_variance != tau2):
        raise ValueError("alpha and mixing_variance must stay the same across looks")
    nc = v.count(n_control, "n_control")
    nt = v.count(n_treatment, "n_treatment")
    if previous is not None and (nc < previous.n_control or nt < previous.n_treatment):
        raise ValueError("n_control and n_treatment are cumulative and must not decrease between looks")
    est = float(treatment_value) - float(control_value)
    llr = float(msprt_log_likelihood_ratio(est, variance, mixing_variance=tau2)[()])
    half = float(_cs_half_width(np.asarray(float(variance)), tau2, a))
    low, high = est - half, est + half
    p = min(1.0, math.exp(-llr))
    if previous is not None:
        p = min(p, previous.always_valid_p_value)
        low, high = max(low, previous.ci_low), min(high, previous.ci_high)
    return SequentialLook(
        look=1 if previous is None else previous.look + 1,
        n_control=nc,
        n_treatment=nt,
        control_value=float(control_value),
        treatment_value=float(treatment_value),
        estimate=est,
        variance=float(variance),
        log_likelihood_ratio=llr,
        always_valid_p_value=p,
        ci_low=low,
        ci_high=high,
        decision=_decision(p, low, high, est, a),
        alpha=a,
        mixing_variance=tau2,
    )


def _run(
    nc: NDArray[np.int64],
    nt: NDArray[np.int64],
    mc: NDArray[np.float64],
    mt: NDArray[np.float64],
    var: NDArray[np.float64],
    tau2: float,
    alpha: float,
) -> tuple[SequentialLook, ...]:
    looks: list[SequentialLook] = []
    prev: SequentialLook | None = None
    for i in range(nc.size):
        prev = msprt_update(
            prev, n_control=int(nc[i]), n_treatment=int(nt[i]), control_value=float(mc[i]),
            treatment_value=float(mt[i]), variance=float(var[i]), mixing_variance=tau2, alpha=alpha,
        )  # fmt: skip
        looks.append(prev)
    return tuple(looks)


def _cumulative(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = v.sample(values, name)
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"{name} must be cumulative (non-decreasing over looks)")
    return arr


def msprt_two_proportions(
    successes_control: ArrayLike,
    trials_control: ArrayLike,
    successes_treatment: ArrayLike,
    trials_treatment: ArrayLike,
    *,
    mixing_variance: float,
    alpha: float = 0.05,
) -> tuple[SequentialLook, ...]:
    """mSPRT for a difference of two proportions, one entry per look of cumulative counts."""
    sc = _cumulative(successes_control, "successes_control")
    nc = _cumulative(trials_control, "trials_control")
    st = _cumulative(successes_treatment, "successes_treatment")
    nt = _cumulative(trials_treatment, "trials_treatment")
    if not (sc.size == nc.size == st.size == nt.size):
        raise ValueError(
            "successes_control, trials_control, successes_treatment and trials_treatment need one entry per look"
        )
    if np.any(nc <= 0) or np.any(nt <= 0):
        raise ValueError("trials_control and trials_treatment must be positive at every look")
    if np.any(sc > nc) or np.any(st > nt):
        raise ValueError("successes must not exceed trials")
    pc, pt = sc / nc, st / nt
    var = pc * (1 - pc) / nc + pt * (1 - pt) / nt
    return _run(nc.astype(np.int64), nt.astype(np.int64), pc, pt, var, mixing_variance, alpha)


def msprt_two_means(
    n_control: ArrayLike,
    mean_control: ArrayLike,
    var_control: ArrayLike,
    n_treatment: ArrayLike,
    mean_treatment: ArrayLike,
    var_treatment: ArrayLike,
    *,
    mixing_variance: float,
    alpha: float = 0.05,
) -> tuple[SequentialLook, ...]:
    """mSPRT for a difference of two means from cumulative per-look count, mean and sample variance."""
    nc = _cumulative(n_control, "n_control")
    nt = _cumulative(n_treatment, "n_treatment")
    mc = v.sample(mean_control, "mean_control")
    mt = v.sample(mean_treatment, "mean_treatment")
    vc = v.sample(var_control, "var_control")
    vt = v.sample(var_treatment, "var_treatment")
    if not (nc.size == mc.size == vc.size == nt.size == mt.size == vt.size):
        raise ValueError("every argument needs one entry per look")
    if np.any(nc < 2) or np.any(nt < 2):
        raise ValueError("n_control and n_treatment must be at least 2 at every look")
    if np.any(vc < 0) or np.any(vt < 0):
        raise ValueError("var_control and var_treatment must be non-negative")
    return _run(nc.astype(np.int64), nt.astype(np.int64), mc, mt, vc / nc + vt / nt, mixing_variance, alpha)
