"""Statistics from SQL aggregates the drift service pushes down to ClickHouse (small helpers).

* :func:`ks_from_grid` and :func:`wasserstein_from_grid`: KS and Wasserstein-1 of a current window
  given only its counts on an equal-width grid over the reference range (plus the sums of the
  values outside it), against a :class:`~.profiles.NumericProfile`. ClickHouse computes the counts
  in one pass (``countResample`` on ``floor((x - lo) / width)``), so the window's rows never leave
  the store.
* :class:`RatioMoments` / :func:`ratio_welch`: a ratio metric ``sum(y) / sum(x)`` over randomisation
  units (errors per request, latency per request, labels per labelled request...) with the
  delta-method variance, from per-arm sums over units that SQL returns.
* :func:`quantile_difference`: difference of two quantiles (e.g. latency p95) with a normal
  interval whose standard errors come from distribution-free order-statistic bands, i.e. three
  exact quantiles per arm instead of the raw samples a bootstrap needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from . import _validation as v
from ._common import MetricResult, difference_result, ratio_lift_ci
from .drift import (
    DEFAULT_THRESHOLDS,
    DriftThresholds,
    KSResult,
    WassersteinResult,
    _test_level,
    _wasserstein_result,
)
from .experiments import welch_ttest_from_stats
from .profiles import NumericProfile

# ------------------------------------------------------------------------------------------- grid

GRID_TAIL = 0.001
"""The grid spans the reference's [0.1 %, 99.9 %] quantiles: a few extreme values cannot stretch it."""


@dataclass(frozen=True)
class Grid:
    """``cells`` equal-width cells over ``[lo, hi)``; with the two tails, ``cells + 2`` counts: index 0
    is ``x < lo``, index ``j`` (1..cells) is ``[lo + (j-1) w, lo + j w)``, index ``cells + 1`` is
    ``x >= hi``. The index is ``clip(floor((x - lo) * inv) + 1, 0, cells + 1)`` with ``inv = 1 / w``;
    SQL evaluates the same float expression with the same constants, so numpy and ClickHouse put
    every value in the same cell."""

    lo: float
    width: float
    cells: int
    degenerate: bool = False  # constant reference: the grid is a sliver just above the value

    @property
    def inv(self) -> float:
        return 1.0 / self.width

    @property
    def hi(self) -> float:
        return self.lo + self.cells * self.width

    def boundaries(self) -> NDArray[np.float64]:
        return self.lo + self.width * np.arange(self.cells + 1, dtype=np.float64)

    def cell_index(self, values: ArrayLike) -> NDArray[np.int64]:
        """The SQL rule in numpy."""
        x = np.asarray(values, dtype=np.float64)
        idx = np.floor((x - self.lo) * self.inv) + 1
        return np.clip(idx, 0, self.cells + 1).astype(np.int64)

    def counts(self, values: ArrayLike) -> NDArray[np.int64]:
        return np.bincount(self.cell_index(values), minlength=self.cells + 2).astype(np.int64)

    def excess(self, values: ArrayLike) -> tuple[float, float]:
        """Sums of ``lo - x`` over the cell-0 values and of ``x - hi`` over the last cell's (SQL's rule)."""
        x = np.asarray(values, dtype=np.float64)
        idx = self.cell_index(x)
        return float(np.sum(self.lo - x[idx == 0])), float(np.sum(x[idx == self.cells + 1] - self.hi))

    def snap(self, edges: ArrayLike) -> tuple[float, ...]:
        """Bin edges moved to the nearest interior cell boundary (duplicates merged)."""
        if self.degenerate:
            return ()
        j = np.rint((np.asarray(edges, dtype=np.float64) - self.lo) * self.inv)
        j = np.unique(np.clip(j, 1, self.cells - 1)).astype(np.int64)
        return tuple(float(self.lo + k * self.width) for k in j)

    def edge_cells(self, edges: Sequence[float]) -> NDArray[np.int64] | None:
        """For edges on cell boundaries: the boundary index of each; None when one is not on the grid."""
        if self.degenerate:
            return np.empty(0, dtype=np.int64) if not edges else None
        e = np.asarray(edges, dtype=np.float64)
        j = np.rint((e - self.lo) * self.inv)
        on_grid = np.abs(self.lo + j * self.width - e) <= 1e-9 * max(abs(self.lo), abs(self.hi), self.width)
        if not np.all(on_grid) or np.any(j < 1) or np.any(j > self.cells - 1):
            return None
        return j.astype(np.int64)

    def bin_counts(self, edges: Sequence[float], cell_counts: ArrayLike) -> NDArray[np.int64] | None:
        """Counts per profile bin from the grid counts, when every edge is a cell boundary.

        Bin ``i`` is ``[edges[i-1], edges[i])``: the cells between the two boundaries (cell 0 and
        the last cell belong to the first and last bins). None when the edges are not on the grid.
        """
        j = self.edge_cells(edges)
        if j is None:
            return None
        counts = np.asarray(cell_counts, dtype=np.int64)[: self.cells + 2]
        # cells 0..j0 belong to bin 0, j0+1..j1 to bin 1, ...: split the cumulative counts there.
        cum = np.concatenate([[0], np.cumsum(counts)])
        cuts = np.concatenate([[0], j + 1, [self.cells + 2]])
        return np.diff(cum[cuts]).astype(np.int64)


def make_grid(points: ArrayLike, cells: int) -> Grid:
    """The grid over the reference's [GRID_TAIL, 1 - GRID_TAIL] quantiles (sorted reference points or
    an equally weighted sketch); the full range if that is empty; a sliver if the reference is constant."""
    cells = v.positive_int(cells, "cells")
    x = np.asarray(points, dtype=np.float64)
    k = x.size
    lo, hi = float(x[int(np.floor(GRID_TAIL * k))]), float(x[int(np.ceil((1 - GRID_TAIL) * k)) - 1])
    if not hi > lo:
        lo, hi = float(x[0]), float(x[-1])
    if not hi > lo:
        return Grid(lo, max(abs(lo), 1.0) * 1e-9 / cells, cells, degenerate=True)
    return Grid(lo, (hi - lo) / cells, cells)


def grid_for(profile: NumericProfile, cells: int) -> Grid:
    """The grid of a profile (see :func:`make_grid`)."""
    return make_grid(profile.quantile_points, cells)


def profile_on_grid(values: ArrayLike, *, n_bins: int, max_points: int, cells: int) -> tuple[NumericProfile, Grid]:
    """Like :func:`~.profiles.build_numeric_profile`, but with the bin edges snapped to the grid, so
    a window's counts per bin follow from its grid counts (no second binning pass in SQL)."""
    from .profiles import build_numeric_profile

    base = build_numeric_profile(values, n_bins=n_bins, max_points=max_points)
    grid = grid_for(base, cells)
    return profile_from_grid_counts(base, grid, grid.counts(values)), grid


def profile_from_grid_counts(sketch: NumericProfile, grid: Grid, cell_counts: ArrayLike) -> NumericProfile:
    """``sketch`` (edges, quantile points, summary) re-binned on grid-snapped edges with exact counts
    from the reference's grid counts (finite values only)."""
    edges = grid.snap(sketch.edges)
    counts = grid.bin_counts(edges, cell_counts)
    assert counts is not None
    return NumericProfile(
        edges=edges,
        counts=tuple(int(c) for c in counts),
        quantile_points=sketch.quantile_points,
        exact=sketch.exact and int(counts.sum()) == len(sketch.quantile_points),
        n=int(counts.sum()),
        mean=sketch.mean,
        std=0.0 if sketch.max <= sketch.min else sketch.std,
        min=sketch.min,
        max=sketch.max,
    )


def _grid_counts(grid: Grid, cell_counts: ArrayLike) -> NDArray[np.int64]:
    counts = v.counts(cell_counts, "cell_counts")
    if counts.size != grid.cells + 2:
        raise ValueError(f"cell_counts must have cells + 2 = {grid.cells + 2} entries, got {counts.size}")
    if counts.sum() <= 0:
        raise ValueError("cell_counts must have a positive total")
    return counts


def _reference_cdf_left(profile: NumericProfile, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Reference ``P(X < x)`` from the profile's points (the whole sample, or equally weighted sketch points)."""
    points = np.asarray(profile.quantile_points, dtype=np.float64)
    return np.searchsorted(points, x, side="left") / points.size


def ks_from_grid(
    profile: NumericProfile,
    grid: Grid,
    cell_counts: ArrayLike,
    *,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> KSResult:
    """Two-sample KS of a current window, given its counts on ``grid``, against a profile.

    The current ECDF is known exactly at every grid boundary and the reference ECDF comes from the
    profile's points, so ``statistic`` is ``max |F_ref - F_cur|`` over the boundaries. The true
    supremum lies between that and the largest cross difference inside a cell (or a tail, where
    either CDF may move by its tail mass); ``max_statistic_error`` is that gap plus the sketch's
    ``1/(2K)`` when the profile is not exact. p-value: Smirnov's asymptotic distribution with the
    true sizes, as scipy uses for large samples.
    """
    counts = _grid_counts(grid, cell_counts)
    m = int(counts.sum())
    bounds = grid.boundaries()
    f_cur = np.cumsum(counts)[: grid.cells + 1] / m  # P(X < b_j), j = 0..cells
    f_ref = _reference_cdf_left(profile, bounds)
    d = float(np.abs(f_ref - f_cur).max())
    if grid.degenerate:  # all reference mass at lo; inside the sliver nothing else is resolved
        upper = d
    else:
        cross = np.maximum(np.abs(f_ref[1:] - f_cur[:-1]), np.abs(f_cur[1:] - f_ref[:-1]))
        tails = max(f_ref[0], f_cur[0], 1.0 - f_ref[-1], 1.0 - f_cur[-1])
        upper = max(d, float(cross.max()), float(tails))
    err = upper - d + (0.0 if profile.exact else 0.5 / len(profile.quantile_points))
    n = float(profile.n)
    en = n * m / (n + m)
    p = _ks_p_value(d, en)
    return KSResult(
        d,
        p,
        _test_level(p, d, thresholds.ks_statistic_warn, thresholds.ks_statistic_alert, thresholds),
        False,
        err,
        profile.n,
        m,
    )


def _ks_p_value(d: float, en: float) -> float:
    """Smirnov's distribution ``kstwo(n)`` at ``n = round(en)``; past n = 10,000 its limit
    ``kstwobign`` at ``d sqrt(n)`` (within 1 % there, and scipy's kstwo takes ~1 ms per 1,000 of n)."""
    n = max(1, round(en))
    p = stats.kstwobign.sf(d * math.sqrt(n)) if n > 10_000 else stats.kstwo.sf(d, n)
    return float(np.clip(p, 0.0, 1.0))


def _abs_integral(r: NDArray[np.float64], c0: NDArray[np.float64], c1: NDArray[np.float64]) -> NDArray[np.float64]:
    """``∫_0^1 |r - (c0 + (c1 - c0) t)| dt`` elementwise (a linear function against a constant)."""
    a, b = r - c0, r - c1
    same = a * b >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (a * a + b * b) / (2 * np.abs(a - b))
    return np.where(same, np.abs(a + b) / 2, crossing)


def wasserstein_from_grid(
    profile: NumericProfile,
    grid: Grid,
    cell_counts: ArrayLike,
    below_excess: float,
    above_excess: float,
    *,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> WassersteinResult:
    """Wasserstein-1 ``∫ |F_ref - F_cur| dx`` of a window from its grid counts against a profile.

    Inside ``[lo, hi)`` the window's values are taken as uniform within each cell (its CDF is
    linear there) and the reference CDF is the step function of the profile's points: the integral
    is exact piece by piece. Each tail contributes ``|E_ref[(lo - X)+] - E_cur[(lo - X)+]|`` (and
    the same above ``hi``), exact when one CDF lies above the other over the tail, as under a shift;
    ``below_excess`` / ``above_excess`` are the window's sums of ``lo - x`` over its values below
    ``lo`` and of ``x - hi`` over those at or above ``hi`` (see :meth:`Grid.excess`). Placing the
    window's values uniformly in their cells moves each by less than a cell, so inside the grid
    the error is below ``grid.width`` (it shows on discrete data, whose mass sits on points).
    """
    counts = _grid_counts(grid, cell_counts)
    m = int(counts.sum())
    for name, x in (("below_excess", below_excess), ("above_excess", above_excess)):
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite")
    points = np.asarray(profile.quantile_points, dtype=np.float64)
    inside = 0.0
    if not grid.degenerate:
        bounds = grid.boundaries()
        cum = np.cumsum(counts)[: grid.cells + 1] / m  # F_cur at the boundaries (left limits)
        inner = points[(points > grid.lo) & (points < grid.hi)]
        xs = np.unique(np.concatenate([bounds, inner]))
        f_cur = np.interp(xs, bounds, cum)  # linear inside each cell
        f_ref = np.searchsorted(points, xs[:-1], side="right") / points.size  # constant on [xs_i, xs_i+1)
        inside = float(np.sum(np.diff(xs) * _abs_integral(f_ref, f_cur[:-1], f_cur[1:])))
    ref_below = float(np.mean(np.maximum(grid.lo - points, 0.0)))
    ref_above = float(np.mean(np.maximum(points - grid.hi, 0.0)))
    tails = abs(ref_below - below_excess / m) + abs(ref_above - above_excess / m)
    return _wasserstein_result(max(0.0, inside + tails), profile.std, False, profile.n, m, thresholds)


# ------------------------------------------------------------------------------- ratio metrics


@dataclass(frozen=True)
class RatioMoments:
    """Per-arm sums over units of a ratio metric ``sum(y) / sum(x)`` (``x``: e.g. requests of the unit,
    ``y``: its errors). ``n`` units; ``sum_x``, ``sum_y``, ``sum_xx``, ``sum_yy``, ``sum_xy``."""

    n: int
    sum_x: float
    sum_y: float
    sum_xx: float
    sum_yy: float
    sum_xy: float

    @property
    def ratio(self) -> float:
        return self.sum_y / self.sum_x if self.sum_x > 0 else math.nan

    @property
    def variance(self) -> float:
        """Delta-method variance of the ratio: ``Var(y - R x) / (n mean(x)^2)`` with sample moments."""
        n = self.n
        if n < 2 or self.sum_x <= 0:
            return math.nan
        mx, my = self.sum_x / n, self.sum_y / n
        var_x = max((self.sum_xx - n * mx * mx) / (n - 1), 0.0)
        var_y = max((self.sum_yy - n * my * my) / (n - 1), 0.0)
        cov = (self.sum_xy - n * mx * my) / (n - 1)
        r = my / mx
        return max(var_y - 2 * r * cov + r * r * var_x, 0.0) / (n * mx * mx)


def ratio_welch(
    control: RatioMoments, treatment: RatioMoments, *, alpha: float = 0.05, metric: str = "ratio"
) -> MetricResult:
    """Welch's test on two ratio metrics with delta-method variances (Deng et al. 2018).

    Each arm is passed to :func:`~.experiments.welch_ttest_from_stats` as a mean with
    ``std = sqrt(variance * n)`` over its ``n`` units, so the interval and p-value are Welch's with
    the units as the observations (clustered requests are not treated as independent).
    """
    for name, arm in (("control", control), ("treatment", treatment)):
        if arm.n < 2 or arm.sum_x <= 0:
            raise ValueError(f"{name} needs at least 2 units and a positive denominator")
    res = welch_ttest_from_stats(
        control.ratio,
        math.sqrt(control.variance * control.n),
        control.n,
        treatment.ratio,
        math.sqrt(treatment.variance * treatment.n),
        treatment.n,
        alpha=alpha,
        metric=metric,
    )
    return replace(res, method="delta_method_welch")


# ------------------------------------------------------------------------------------ quantiles


def order_statistic_levels(quantile: float, n: int, z: float) -> tuple[float, float]:
    """Levels of the distribution-free band ``q ± z sqrt(q (1 - q) / n)`` around quantile ``q``."""
    q = v.open_unit(quantile, "quantile")
    half = z * math.sqrt(q * (1 - q) / max(n, 1))
    return max(0.0, q - half), min(1.0, q + half)


def quantile_difference(
    control: tuple[int, float, float, float],
    treatment: tuple[int, float, float, float],
    *,
    quantile: float,
    alpha: float = 0.05,
    metric: str | None = None,
) -> MetricResult:
    """``quantile(treatment) - quantile(control)`` with a normal interval.

    Each arm is ``(n, q_hat, q_low, q_high)``: the sample quantile and the exact quantiles at
    :func:`order_statistic_levels` with ``z = Phi^-1(1 - alpha/2)``. ``[q_low, q_high]`` is the
    classic distribution-free interval for the quantile, so its half-width over ``z`` is the
    standard error (the Maritz-Jarrett / Bloch-Gastwirth idea without a density estimate). The
    arms are independent, so the difference has ``se = sqrt(se_c^2 + se_t^2)``; accurate once
    each arm has a few hundred observations beyond the quantile, like the bootstrap.
    """
    a = v.open_unit(alpha, "alpha")
    q = v.open_unit(quantile, "quantile")
    z = float(stats.norm.ppf(1 - a / 2))
    (nc, qc, lc, hc), (nt, qt, lt, ht) = control, treatment
    if nc < 2 or nt < 2:
        raise ValueError("each arm needs at least 2 observations")
    se_c, se_t = (hc - lc) / (2 * z), (ht - lt) / (2 * z)
    se = math.sqrt(se_c**2 + se_t**2)
    diff = qt - qc
    if se == 0:
        p_value, low, high = (1.0 if diff == 0 else 0.0), diff, diff
    else:
        p_value = float(2 * stats.norm.sf(abs(diff) / se))
        low, high = diff - z * se, diff + z * se
    rel, rel_low, rel_high = ratio_lift_ci(qt, se_t, qc, se_c, a)
    return difference_result(
        metric or f"p{round(q * 100, 4):g}",
        "quantile_order_statistics",
        qc,
        qt,
        (low, high),
        p_value,
        a,
        nc,
        nt,
        relative_lift=rel,
        relative_ci_low=rel_low,
        relative_ci_high=rel_high,
    )
