"""Bayesian Beta-Binomial view of a conversion metric, and Thompson-sampling allocation for bandits.

With a ``Beta(prior_alpha, prior_beta)`` prior, each arm's rate has the posterior
``Beta(prior_alpha + successes, prior_beta + failures)``. ``P(treatment > control)`` and the
expected losses are computed in closed form (Evan Miller's sum, exact when one posterior parameter
is an integer, as with the default uniform prior; otherwise by adaptive quadrature). Credible
intervals of the difference and of the relative lift, and Thompson weights, use seeded Monte Carlo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import integrate, special
from scipy import stats as sps

from . import _validation as v
from ._common import Seed, rng_from

_MAX_SUM_TERMS = 5_000_000


def _h_sum(a_x: float, b_x: float, a_y: float, b_y: float) -> float:
    """P(X > Y) for X ~ Beta(a_x, b_x), Y ~ Beta(a_y, b_y), with integer a_x (Evan Miller's formula)."""
    i = np.arange(int(a_x), dtype=np.float64)
    log_terms = (
        special.betaln(a_y + i, b_y + b_x) - np.log(b_x + i) - special.betaln(1 + i, b_x) - special.betaln(a_y, b_y)
    )
    return float(np.exp(special.logsumexp(log_terms)))


def prob_beta_greater(a_x: float, b_x: float, a_y: float, b_y: float) -> float:
    """P(X > Y) for independent X ~ Beta(a_x, b_x) and Y ~ Beta(a_y, b_y).

    Exact finite sum over the smallest integer parameter (using ``P(X > Y) = 1 - P(Y > X)`` and
    ``P(X > Y) = P(1 - Y > 1 - X)``); adaptive quadrature of ``f_X * F_Y`` when no parameter is an
    integer or the sum would be too long.
    """
    for name, x in (("a_x", a_x), ("b_x", b_x), ("a_y", a_y), ("b_y", b_y)):
        v.positive(x, name)
    options = [
        (a_x, lambda: _h_sum(a_x, b_x, a_y, b_y)),
        (a_y, lambda: 1 - _h_sum(a_y, b_y, a_x, b_x)),
        (b_y, lambda: _h_sum(b_y, a_y, b_x, a_x)),
        (b_x, lambda: 1 - _h_sum(b_x, a_x, b_y, a_y)),
    ]
    usable = [(k, f) for k, f in options if float(k).is_integer() and k <= _MAX_SUM_TERMS]
    if usable:
        return float(np.clip(min(usable, key=lambda kf: kf[0])[1](), 0.0, 1.0))
    x_dist, y_dist = sps.beta(a_x, b_x), sps.beta(a_y, b_y)
    lo, hi = float(x_dist.ppf(1e-14)), float(x_dist.isf(1e-14))
    value, _ = integrate.quad(lambda t: x_dist.pdf(t) * y_dist.cdf(t), lo, hi, points=[x_dist.mean()], limit=200)
    return float(np.clip(value, 0.0, 1.0))


@dataclass(frozen=True)
class BetaBinomialResult:
    """Posterior comparison of two conversion rates.

    ``expected_loss_treatment = E[max(p_c - p_t, 0)]`` is the rate lost on average by shipping the
    treatment (and vice versa); a common rule ships when it is below a "threshold of caring".
    Interval fields are equal-tailed ``credible`` intervals from ``draws`` posterior draws.
    """

    prob_treatment_better: float
    expected_loss_treatment: float
    expected_loss_control: float
    control_mean: float
    treatment_mean: float
    difference_ci_low: float
    difference_ci_high: float
    relative_lift_ci_low: float
    relative_lift_ci_high: float
    credible: float
    prior_alpha: float
    prior_beta: float
    draws: int


def beta_binomial_ab(
    successes_control: int,
    trials_control: int,
    successes_treatment: int,
    trials_treatment: int,
    *,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    credible: float = 0.95,
    draws: int = 100_000,
    seed: Seed = 0,
) -> BetaBinomialResult:
    """Probability to beat control, expected losses (closed form) and credible intervals (Monte Carlo)."""
    sc, nc = v.successes_trials(successes_control, trials_control, "successes_control", "trials_control")
    st, nt = v.successes_trials(successes_treatment, trials_treatment, "successes_treatment", "trials_treatment")
    a0 = v.positive(prior_alpha, "prior_alpha")
    b0 = v.positive(prior_beta, "prior_beta")
    cr = v.open_unit(credible, "credible")
    n_draws = v.positive_int(draws, "draws")
    ac, bc = a0 + sc, b0 + nc - sc
    at, bt = a0 + st, b0 + nt - st
    mean_c, mean_t = ac / (ac + bc), at / (at + bt)
    prob_better = prob_beta_greater(at, bt, ac, bc)
    # E[p_c 1{p_c > p_t}] = mean_c P(C' > T) with C' ~ Beta(ac + 1, bc) (size-biased posterior), etc.
    loss_t = mean_c * prob_beta_greater(ac + 1, bc, at, bt) - mean_t * prob_beta_greater(ac, bc, at + 1, bt)
    loss_c = mean_t * prob_beta_greater(at + 1, bt, ac, bc) - mean_c * prob_beta_greater(at, bt, ac + 1, bc)
    rng = rng_from(seed)
    pc = rng.beta(ac, bc, size=n_draws)
    pt = rng.beta(at, bt, size=n_draws)
    tails = [(1 - cr) / 2, (1 + cr) / 2]
    d_low, d_high = (float(x) for x in np.quantile(pt - pc, tails))
    r_low, r_high = (float(x) for x in np.quantile(pt / pc - 1, tails))
    return BetaBinomialResult(
        prob_treatment_better=prob_better,
        expected_loss_treatment=max(loss_t, 0.0),
        expected_loss_control=max(loss_c, 0.0),
        control_mean=mean_c,
        treatment_mean=mean_t,
        difference_ci_low=d_low,
        difference_ci_high=d_high,
        relative_lift_ci_low=r_low,
        relative_lift_ci_high=r_high,
        credible=cr,
        prior_alpha=a0,
        prior_beta=b0,
        draws=n_draws,
    )


@dataclass(frozen=True)
class ThompsonAllocation:
    """Traffic weights per arm (summing to 1) and each arm's posterior probability of being best."""

    weights: tuple[float, ...]
    prob_best: tuple[float, ...]
    floor: float
    draws: int


def thompson_weights(
    successes: Sequence[int] | ArrayLike,
    trials: Sequence[int] | ArrayLike,
    *,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    floor: float = 0.0,
    draws: int = 10_000,
    seed: Seed = 0,
) -> ThompsonAllocation:
    """Thompson-sampling allocation: route to each arm with its posterior probability of being best.

    Routing each request to the arm with the largest posterior draw sends, in expectation, exactly
    ``P(arm is best)`` of the traffic; the router applies these weights per batch instead of drawing
    per request. ``prob_best`` is estimated from ``draws`` seeded joint posterior draws (standard error
    at most ``0.5 / sqrt(draws)``). ``floor`` reserves a minimum share for every arm
    (``weights = floor + (1 - k * floor) * prob_best``) so no arm starves while the data are young.
    """
    s = v.counts(successes, "successes", allow_all_zero=True)
    n = v.counts(trials, "trials", allow_all_zero=True)
    if s.size != n.size:
        raise ValueError(f"successes and trials must have the same length, got {s.size} and {n.size}")
    if s.size < 2:
        raise ValueError("successes and trials must describe at least two arms")
    if np.any(s > n):
        raise ValueError("successes must not exceed trials for any arm")
    a0 = v.positive(prior_alpha, "prior_alpha")
    b0 = v.positive(prior_beta, "prior_beta")
    k = s.size
    fl = float(floor)
    if not (0.0 <= fl < 1.0 / k):
        raise ValueError(f"floor must lie in [0, 1/{k}) for {k} arms, got {floor!r}")
    n_draws = v.positive_int(draws, "draws")
    rng = rng_from(seed)
    samples = rng.beta(a0 + s, b0 + n - s, size=(n_draws, k))
    prob_best = np.bincount(np.argmax(samples, axis=1), minlength=k) / n_draws
    w = fl + (1 - k * fl) * prob_best
    w = w / w.sum()  # exact 1 up to rounding
    return ThompsonAllocation(tuple(float(x) for x in w), tuple(float(x) for x in prob_best), fl, n_draws)
