"""Input checks shared by the statistics modules.

Every public function validates its arguments up front and raises ``ValueError`` naming the bad
argument, so a service can turn the message straight into an INVALID_ARGUMENT status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray


def sample(values: ArrayLike, name: str, *, min_size: int = 1) -> NDArray[np.float64]:
    """Return ``values`` as a finite 1-D float array with at least ``min_size`` elements."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size < min_size:
        raise ValueError(f"{name} must contain at least {min_size} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; drop or impute missing values first")
    return arr


def counts(values: ArrayLike, name: str, *, allow_all_zero: bool = False) -> NDArray[np.int64]:
    """Return ``values`` as a 1-D array of non-negative integer counts."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric counts: {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty one-dimensional sequence of counts")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError(f"{name} must not contain negative counts")
    if np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must contain whole numbers")
    if not allow_all_zero and arr.sum() <= 0:
        raise ValueError(f"{name} must have a positive total")
    return arr.astype(np.int64)


def count(value: float, name: str) -> int:
    """Return ``value`` as a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value < 0 or float(value) != round(float(value)):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
    return int(value)


def successes_trials(successes: float, trials: float, s_name: str, n_name: str) -> tuple[int, int]:
    """Validate a (successes, trials) pair of a binomial metric."""
    s = count(successes, s_name)
    n = count(trials, n_name)
    if n == 0:
        raise ValueError(f"{n_name} must be positive")
    if s > n:
        raise ValueError(f"{s_name} ({s}) must not exceed {n_name} ({n})")
    return s, n


def open_unit(value: float, name: str) -> float:
    """Return ``value`` if it lies strictly between 0 and 1 (alpha, power, rates, quantiles)."""
    v = float(value)
    if not (0.0 < v < 1.0):
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return v


def positive(value: float, name: str) -> float:
    """Return ``value`` if it is a finite number > 0."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def positive_int(value: int, name: str) -> int:
    """Return ``value`` if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def weights(values: Sequence[float] | ArrayLike, name: str) -> NDArray[np.float64]:
    """Return non-negative finite weights with a positive sum, normalised to sum to 1."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty one-dimensional sequence")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    total = arr.sum()
    if total <= 0:
        raise ValueError(f"{name} must sum to a positive number")
    return arr / total
