"""Sample size and power for two-arm experiments (statsmodels power classes).

* Proportions: ``NormalIndPower`` on Cohen's effect size ``h = 2 asin(sqrt(p_t)) - 2 asin(sqrt(p_c))``
  (statsmodels ``proportion_effectsize``). The arcsine transform stabilises the variance, so the
  normal approximation is accurate at small rates; for 5 % -> 5.5 % at alpha 0.05 two-sided and power
  0.8 it gives 31,218 per arm (the textbook closed form
  ``(z_a sqrt(2 pbar qbar) + z_b sqrt(p_c q_c + p_t q_t))**2 / (p_t - p_c)**2`` gives 31,234).
* Means: ``TTestIndPower`` on Cohen's ``d = mde / std`` (noncentral t, exact for normal data with
  equal variances; at A/B sample sizes it coincides with the normal formula).

``ratio`` is ``n_treatment / n_control``, as in statsmodels. Sample sizes are rounded up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import proportion_effectsize

from . import _validation as v

Sides = Literal["two-sided", "one-sided"]


@dataclass(frozen=True)
class SampleSizeResult:
    """Units needed per arm to detect the effect with the requested power."""

    n_control: int
    n_treatment: int
    total: int
    effect_size: float
    alpha: float
    power: float
    method: str


def _alternative(sides: Sides) -> str:
    if sides not in ("two-sided", "one-sided"):
        raise ValueError(f"sides must be 'two-sided' or 'one-sided', got {sides!r}")
    return "two-sided" if sides == "two-sided" else "larger"


def _treatment_rate(baseline_rate: float, relative_mde: float | None, absolute_mde: float | None) -> float:
    p = v.open_unit(baseline_rate, "baseline_rate")
    if (relative_mde is None) == (absolute_mde is None):
        raise ValueError("exactly one of relative_mde and absolute_mde must be given")
    if relative_mde is not None:
        if relative_mde == 0 or not math.isfinite(relative_mde):
            raise ValueError("relative_mde must be a non-zero finite number")
        treated = p * (1 + relative_mde)
    else:
        assert absolute_mde is not None
        if absolute_mde == 0 or not math.isfinite(absolute_mde):
            raise ValueError("absolute_mde must be a non-zero finite number")
        treated = p + absolute_mde
    if not 0 < treated < 1:
        raise ValueError(f"baseline_rate and the MDE give a treatment rate {treated} outside (0, 1)")
    return treated


def sample_size_two_proportions(
    baseline_rate: float,
    *,
    relative_mde: float | None = None,
    absolute_mde: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
    sides: Sides = "two-sided",
) -> SampleSizeResult:
    """Units per arm for a two-proportion z-test (relative MDE 0.1 means 5 % -> 5.5 %)."""
    treated = _treatment_rate(baseline_rate, relative_mde, absolute_mde)
    a = v.open_unit(alpha, "alpha")
    pw = v.open_unit(power, "power")
    r = v.positive(ratio, "ratio")
    h = abs(float(proportion_effectsize(treated, baseline_rate)))
    n1 = float(NormalIndPower().solve_power(effect_size=h, alpha=a, power=pw, ratio=r, alternative=_alternative(sides)))
    nc = math.ceil(n1)
    nt = math.ceil(n1 * r)
    return SampleSizeResult(nc, nt, nc + nt, h, a, pw, "normal approximation on Cohen's h (arcsine)")


def power_two_proportions(
    baseline_rate: float,
    treatment_rate: float,
    n_control: int,
    *,
    alpha: float = 0.05,
    ratio: float = 1.0,
    sides: Sides = "two-sided",
) -> float:
    """Power of the two-proportion z-test with ``n_control`` and ``ratio * n_control`` units."""
    p = v.open_unit(baseline_rate, "baseline_rate")
    q = v.open_unit(treatment_rate, "treatment_rate")
    n = v.positive(n_control, "n_control")
    h = abs(float(proportion_effectsize(q, p)))
    return float(
        NormalIndPower().power(
            effect_size=h, nobs1=n, alpha=v.open_unit(alpha, "alpha"), ratio=v.positive(ratio, "ratio"),
            alternative=_alternative(sides),
        )
    )  # fmt: skip


def sample_size_means(
    std: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
    sides: Sides = "two-sided",
) -> SampleSizeResult:
    """Units per arm for a two-sample t-test to detect an absolute difference ``mde`` given the metric's std."""
    s = v.positive(std, "std")
    if mde == 0 or not math.isfinite(mde):
        raise ValueError("mde must be a non-zero finite number")
    a = v.open_unit(alpha, "alpha")
    pw = v.open_unit(power, "power")
    r = v.positive(ratio, "ratio")
    d = abs(mde) / s
    n1 = float(TTestIndPower().solve_power(effect_size=d, alpha=a, power=pw, ratio=r, alternative=_alternative(sides)))
    nc = math.ceil(n1)
    nt = math.ceil(n1 * r)
    return SampleSizeResult(nc, nt, nc + nt, d, a, pw, "two-sample t-test on Cohen's d (noncentral t)")


def power_means(
    std: float,
    mde: float,
    n_control: int,
    *,
    alpha: float = 0.05,
    ratio: float = 1.0,
    sides: Sides = "two-sided",
) -> float:
    """Power of the two-sample t-test for an absolute difference ``mde``."""
    s = v.positive(std, "std")
    if not math.isfinite(mde):
        raise ValueError("mde must be finite")
    n = v.positive(n_control, "n_control")
    if n < 2:
        raise ValueError("n_control must be at least 2")
    return float(
        TTestIndPower().power(
            effect_size=abs(mde) / s, nobs1=n, alpha=v.open_unit(alpha, "alpha"), ratio=v.positive(ratio, "ratio"),
            alternative=_alternative(sides),
        )
    )  # fmt: skip
