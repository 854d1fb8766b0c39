"""Deterministic experiment assignment: pure functions, no I/O, no state.

A unit (user, entity; a request when the caller sends no unit id) lands in one of BUCKETS
buckets by a stable hash of the experiment's salt and the unit id, so the same unit always gets
the same variant for as long as the experiment's salt and weights stay the same. Holdout buckets
sit at the top of the range; the variants share the rest in consecutive ranges in their listed
order, so growing the first variant (a canary ramp 1% -> 5% -> 25%) only moves units into it.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass

from services.common.routing import HOLDOUT_VARIANT, STABLE_VARIANT, Experiment, RouteTarget, Shadow

BUCKETS = 10_000


def bucket(salt: str, unit_id: str) -> int:
    """The unit's bucket in [0, BUCKETS): blake2b (8-byte digest) of "<salt>\\0<unit id>" (UTF-8)
    read as a big-endian integer, mod BUCKETS. Stable across processes, machines and languages."""
    digest = hashlib.blake2b(f"{salt}\0{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Bucketer:
    """bucket(salt, ·) with the salt hashed once: the hot path only hashes the unit id."""

    __slots__ = ("_base",)

    def __init__(self, salt: str) -> None:
        self._base = hashlib.blake2b(f"{salt}\0".encode(), digest_size=8)

    def __call__(self, unit_id: str) -> int:
        hasher = self._base.copy()
        hasher.update(unit_id.encode())
        return int.from_bytes(hasher.digest(), "big") % BUCKETS


def experiment_salt(experiment: Experiment) -> str:
    return experiment.salt or experiment.name


def holdout_buckets(experiment: Experiment) -> int:
    """How many buckets (at the top of the range) the holdout takes."""
    fraction = min(max(experiment.holdout_fraction, 0.0), 1.0)
    return round(fraction * BUCKETS)


def variant_bounds(experiment: Experiment) -> tuple[int, ...]:
    """Exclusive upper bucket of each variant, in listed order; the last one ends where holdout starts.

    Bounds are rounded from cumulative weights, so a variant's share is exact to 1/BUCKETS and
    the first variant's range only grows when its weight does (the other ranges shift up).
    """
    usable = BUCKETS - holdout_buckets(experiment)
    weights = [max(v.weight, 0.0) for v in experiment.variants]
    total = sum(weights)
    if total <= 0:
        return tuple(0 for _ in weights)
    bounds, cumulative = [], 0.0
    for weight in weights:
        cumulative += weight
        bounds.append(round(cumulative / total * usable))
    bounds[-1] = usable
    return tuple(bounds)


@dataclass(frozen=True, slots=True)
class CompiledExperiment:
    """An experiment's bucket layout, computed once per routing table (the hot path only bisects)."""

    name: str
    bucket: Bucketer
    bounds: tuple[int, ...]
    holdout_start: int  # buckets >= this are holdout

    @classmethod
    def of(cls, experiment: Experiment) -> CompiledExperiment:
        return cls(
            experiment.name,
            Bucketer(experiment_salt(experiment)),
            variant_bounds(experiment),
            BUCKETS - holdout_buckets(experiment),
        )

    def index(self, unit_id: str) -> int:
        """Position of the unit's variant in the experiment's list, -1 for holdout, -2 for stable
        (only when every weight is 0)."""
        b = self.bucket(unit_id)
        if b >= self.holdout_start:
            return -1
        index = bisect_right(self.bounds, b)
        return index if index < len(self.bounds) else -2


def assign(experiment: Experiment, unit_id: str, stable: RouteTarget) -> tuple[str, RouteTarget]:
    """(variant name, target) for this unit. Holdout (and an experiment whose weights are all 0)
    is served by the route's stable target, under the variant name "holdout" (resp. "stable")."""
    index = CompiledExperiment.of(experiment).index(unit_id)
    if index == -1:
        return HOLDOUT_VARIANT, stable
    if index == -2:
        return STABLE_VARIANT, stable
    variant = experiment.variants[index]
    return variant.name, variant.target


def shadow_threshold(fraction: float) -> int:
    """Buckets (of BUCKETS) that a shadow with this fraction samples."""
    return round(min(max(fraction, 0.0), 1.0) * BUCKETS)


def shadow_sampled(shadow: Shadow, prediction_id: str) -> bool:
    """Whether this prediction is copied to the shadow: a hash of the prediction id (per shadow)."""
    threshold = shadow_threshold(shadow.fraction)
    if threshold >= BUCKETS:
        return True
    return threshold > 0 and bucket(shadow.name, prediction_id) < threshold
