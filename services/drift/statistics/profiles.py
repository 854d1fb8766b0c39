"""Reference profiles: statistics of the reference data computed once, cached as JSON.

A drift check compares the current window against a :class:`ReferenceProfile` instead of re-reading
the reference data. For a numeric feature the profile holds:

* ``edges``: interior bin edges at the reference deciles (or ``n_bins`` quantiles). Bin ``i`` is
  ``[edges[i-1], edges[i])`` with the first bin open to ``-inf`` and the last open to ``+inf``, so a
  current value outside the reference range still lands in a bin. The bin index of ``x`` is the
  number of edges ``<= x``; in ClickHouse that is ``arrayCount(e -> e <= x, edges)``, so the
  service can ``GROUP BY`` it and pass the counts to :func:`~.drift.psi_from_counts`. Duplicate
  quantiles (heavy ties, e.g. token counts) are merged, so a profile may have fewer bins than asked.
* ``counts``: reference counts per bin (PSI, Jensen-Shannon: exact for the given binning).
* ``quantile_points``: the full sorted reference when it has at most ``max_points`` values
  (``exact=True``: KS and Wasserstein are then exactly scipy's two-sample results), otherwise the
  ``K = max_points`` inverted-CDF quantiles at the cell midpoints ``(k + 0.5) / K``, ``k = 0..K-1``
  (``exact=False``). Treating those points as an equally weighted sample approximates the reference
  ECDF to within ``1/(2K)`` everywhere, so the KS statistic is within ``1/(2K)`` of the exact one
  (p-value from Smirnov's asymptotic distribution with the true reference size), and the
  Wasserstein-1 distance (a midpoint rule for the integral of the quantile-function difference) is
  within ``(max - min) / K``, in practice far less.
* ``n, mean, std, min, max``: summary, the std scales the Wasserstein distance.

A categorical feature keeps its category counts; a category unseen in the reference simply has
count 0 there (see :func:`~.drift.chi_square_from_counts`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _validation as v

PROFILE_SCHEMA_VERSION = 1
DEFAULT_N_BINS = 10
DEFAULT_MAX_POINTS = 2001


@dataclass(frozen=True)
class NumericProfile:
    """Cached statistics of one numeric reference feature (see the module docstring)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    quantile_points: tuple[float, ...]
    exact: bool
    n: int
    mean: float
    std: float
    min: float
    max: float

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.edges) + 1:
            raise ValueError(f"counts must have len(edges) + 1 = {len(self.edges) + 1} entries, got {len(self.counts)}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        if any(c < 0 for c in self.counts) or sum(self.counts) != self.n or self.n < 1:
            raise ValueError("counts must be non-negative and sum to n >= 1")
        if not self.quantile_points:
            raise ValueError("quantile_points must not be empty")
        if self.exact and len(self.quantile_points) != self.n:
            raise ValueError("an exact profile must store all n reference values in quantile_points")

    @property
    def n_bins(self) -> int:
        """Number of bins (``len(edges) + 1``)."""
        return len(self.edges) + 1

    def proportions(self) -> NDArray[np.float64]:
        """Reference proportion per bin."""
        return np.asarray(self.counts, dtype=np.float64) / self.n

    def bin_index(self, values: ArrayLike) -> NDArray[np.int64]:
        """Bin of each value: the number of edges ``<= value`` (same rule as the SQL in the docstring)."""
        x = v.sample(values, "values", min_size=0)
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="right").astype(np.int64)

    def bin_counts(self, values: ArrayLike) -> NDArray[np.int64]:
        """Counts of ``values`` per reference bin; what the service gets from ClickHouse."""
        return np.bincount(self.bin_index(values), minlength=self.n_bins).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "kind": "numeric",
            "edges": [float(e) for e in self.edges],
            "counts": [int(c) for c in self.counts],
            "quantile_points": [float(q) for q in self.quantile_points],
            "exact": bool(self.exact),
            "n": int(self.n),
            "mean": float(self.mean),
            "std": float(self.std),
            "min": float(self.min),
            "max": float(self.max),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericProfile:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed document."""
        try:
            return cls(
                edges=tuple(float(e) for e in data["edges"]),
                counts=tuple(int(c) for c in data["counts"]),
                quantile_points=tuple(float(q) for q in data["quantile_points"]),
                exact=bool(data["exact"]),
                n=int(data["n"]),
                mean=float(data["mean"]),
                std=float(data["std"]),
                min=float(data["min"]),
                max=float(data["max"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"data is not a numeric profile: {exc!r}") from exc


@dataclass(frozen=True)
class CategoricalProfile:
    """Cached category counts of one categorical reference feature."""

    counts: Mapping[str, int]

    def __post_init__(self) -> None:
        clean = {str(k): v.count(c, f"counts[{k!r}]") for k, c in self.counts.items()}
        if sum(clean.values()) <= 0:
            raise ValueError("counts must have a positive total")
        object.__setattr__(self, "counts", clean)

    @property
    def n(self) -> int:
        """Total reference count."""
        return sum(self.counts.values())

    def proportions(self) -> dict[str, float]:
        """Reference frequency of each category."""
        n = self.n
        return {k: c / n for k, c in self.counts.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"kind": "categorical", "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalProfile:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(counts=dict(data["counts"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"data is not a categorical profile: {exc!r}") from exc


@dataclass(frozen=True)
class ReferenceProfile:
    """Profiles of every monitored feature of one model version, serialisable as one JSON document."""

    numeric: Mapping[str, NumericProfile] = field(default_factory=dict)
    categorical: Mapping[str, CategoricalProfile] = field(default_factory=dict)
    schema_version: int = PROFILE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        overlap = set(self.numeric) & set(self.categorical)
        if overlap:
            raise ValueError(f"feature names used as both numeric and categorical: {sorted(overlap)}")
        object.__setattr__(self, "numeric", dict(self.numeric))
        object.__setattr__(self, "categorical", dict(self.categorical))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "schema_version": self.schema_version,
            "numeric": {k: p.to_dict() for k, p in self.numeric.items()},
            "categorical": {k: p.to_dict() for k, p in self.categorical.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Inverse of :meth:`to_dict`; rejects an unknown schema version."""
        version = data.get("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r} is not supported (expected {PROFILE_SCHEMA_VERSION})")
        return cls(
            numeric={k: NumericProfile.from_dict(p) for k, p in data.get("numeric", {}).items()},
            categorical={k: CategoricalProfile.from_dict(p) for k, p in data.get("categorical", {}).items()},
        )

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


def build_numeric_profile(
    values: ArrayLike, *, n_bins: int = DEFAULT_N_BINS, max_points: int = DEFAULT_MAX_POINTS
) -> NumericProfile:
    """Profile a numeric reference sample: quantile bin edges, bin counts and a quantile sketch."""
    x = np.sort(v.sample(values, "values"))
    n_bins = v.positive_int(n_bins, "n_bins")
    max_points = v.positive_int(max_points, "max_points")
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])) if n_bins > 1 else np.empty(0)
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
    exact = x.size <= max_points
    points = x if exact else np.quantile(x, (np.arange(max_points) + 0.5) / max_points, method="inverted_cdf")
    return NumericProfile(
        edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        quantile_points=tuple(float(p) for p in points),
        exact=bool(exact),
        n=int(x.size),
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        min=float(x[0]),
        max=float(x[-1]),
    )


def build_categorical_profile(values: Iterable[object] | Mapping[str, int]) -> CategoricalProfile:
    """Profile a categorical reference: raw labels (any hashable, stored as ``str``) or a count mapping."""
    if isinstance(values, Mapping):
        return CategoricalProfile(counts={str(k): c for k, c in values.items()})
    tally = Counter(str(x) for x in values)
    if not tally:
        raise ValueError("values must not be empty")
    return CategoricalProfile(counts=dict(tally))


def build_reference_profile(
    *,
    numeric: Mapping[str, ArrayLike] | None = None,
    categorical: Mapping[str, Iterable[object] | Mapping[str, int]] | None = None,
    n_bins: int = DEFAULT_N_BINS,
    max_points: int = DEFAULT_MAX_POINTS,
) -> ReferenceProfile:
    """Profile every feature of a reference data set once."""
    if not numeric and not categorical:
        raise ValueError("numeric or categorical must name at least one feature")
    return ReferenceProfile(
        numeric={k: build_numeric_profile(x, n_bins=n_bins, max_points=max_points) for k, x in (numeric or {}).items()},
        categorical={k: build_categorical_profile(x) for k, x in (categorical or {}).items()},
    )
