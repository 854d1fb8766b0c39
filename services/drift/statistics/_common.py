"""Result type shared by the A/B analysis functions, and small helpers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

Decision = Literal["increase", "decrease", "no_significant_difference", "continue"]
"""``increase``/``decrease``: treatment differs from control in that direction at the test's alpha;
``continue``: a sequential test that has not crossed its boundary yet."""

Seed = int | np.random.Generator | None


@dataclass(frozen=True)
class MetricResult:
    """Outcome of one metric comparison, treatment vs control, ready to be sent by a service.

    ``estimate`` is the effect (``treatment - control`` unless ``method`` says otherwise, e.g. the
    probability of superiority for Mann-Whitney, whose ``null_value`` is 0.5). ``ci_low``/``ci_high``
    bound it at confidence ``1 - alpha``. Fixed-horizon tests fill ``p_value``; sequential tests fill
    ``always_valid_p_value`` (valid however often it is looked at) and leave ``p_value`` None.
    """

    metric: str
    method: str
    control_value: float
    treatment_value: float
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float | None
    decision: Decision
    alpha: float
    n_control: int
    n_treatment: int
    null_value: float = 0.0
    always_valid_p_value: float | None = None
    relative_lift: float | None = None
    relative_ci_low: float | None = None
    relative_ci_high: float | None = None
    variance_reduction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable; infinities become None)."""
        return {k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in asdict(self).items()}


def decide(p_value: float, alpha: float, estimate: float, null_value: float = 0.0) -> Decision:
    """Fixed-horizon decision: significant at ``alpha`` and in which direction."""
    if p_value < alpha and estimate != null_value:
        return "increase" if estimate > null_value else "decrease"
    return "no_significant_difference"


def difference_result(
    metric: str,
    method: str,
    control_value: float,
    treatment_value: float,
    ci: tuple[float, float],
    p_value: float,
    alpha: float,
    n_control: int,
    n_treatment: int,
    **extra: Any,
) -> MetricResult:
    """A fixed-horizon result whose estimate is ``treatment - control``, decided at ``alpha``."""
    diff = treatment_value - control_value
    return MetricResult(
        metric=metric,
        method=method,
        control_value=control_value,
        treatment_value=treatment_value,
        estimate=diff,
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        p_value=p_value,
        decision=decide(p_value, alpha, diff),
        alpha=alpha,
        n_control=int(n_control),
        n_treatment=int(n_treatment),
        **extra,
    )


def ratio_lift_ci(
    mean_t: float, se_t: float, mean_c: float, se_c: float, alpha: float
) -> tuple[float | None, float | None, float | None]:
    """Relative lift ``mean_t / mean_c - 1`` with a delta-method normal interval (independent arms)."""
    if mean_c == 0:
        return None, None, None
    ratio = mean_t / mean_c
    se = math.sqrt(se_t**2 / mean_c**2 + mean_t**2 * se_c**2 / mean_c**4)
    z = float(stats.norm.ppf(1 - alpha / 2))
    return ratio - 1, ratio - 1 - z * se, ratio - 1 + z * se


def rng_from(seed: Seed) -> np.random.Generator:
    """A numpy Generator from an int seed, an existing Generator, or None (fresh entropy)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
