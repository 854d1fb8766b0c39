"""Experiment assignment: deterministic, sticky, accurate splits, holdout, monotone canary ramps."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from scipy.stats import chisquare

from services.common.routing import HOLDOUT_VARIANT, STABLE_VARIANT, Experiment, RouteTarget, Shadow, Variant
from services.router.assignment import (
    BUCKETS,
    Bucketer,
    CompiledExperiment,
    assign,
    bucket,
    shadow_sampled,
    variant_bounds,
)

STABLE = RouteTarget("tabular_v1", "", "1")
CANARY = RouteTarget("tabular_v2", "", "2")
OTHER = RouteTarget("tabular_v3", "", "3")
UNITS = [f"user-{i}" for i in range(100_000)]


def experiment(*weights: tuple[str, RouteTarget, float], holdout: float = 0.0, salt: str = "exp-1") -> Experiment:
    return Experiment("exp", salt, tuple(Variant(name, target, weight) for name, target, weight in weights), holdout)


def canary_at(fraction: float, holdout: float = 0.0) -> Experiment:
    return experiment(("canary", CANARY, fraction), ("stable", STABLE, 1.0 - fraction), holdout=holdout)


def test_bucket_is_in_range_deterministic_and_pinned() -> None:
    values = [bucket("salt", unit) for unit in UNITS[:5000]]
    assert all(0 <= v < BUCKETS for v in values)
    assert values == [bucket("salt", unit) for unit in UNITS[:5000]]
    # Pinned: the hash is part of the contract (other routers, other languages, restarts).
    assert bucket("exp-salt", "user-1") == 6946
    assert bucket("", "") == 5896


def test_bucketer_matches_bucket() -> None:
    bucketer = Bucketer("exp-salt")
    assert all(bucketer(unit) == bucket("exp-salt", unit) for unit in UNITS[:2000])
    assert bucketer("ünïcode-üser") == bucket("exp-salt", "ünïcode-üser")


def test_buckets_are_uniform() -> None:
    counts = Counter(bucket("uniform", unit) * 20 // BUCKETS for unit in UNITS)
    assert chisquare([counts[i] for i in range(20)]).pvalue > 0.001


def test_assignment_is_sticky() -> None:
    exp = experiment(("a", STABLE, 1), ("b", CANARY, 1), ("c", OTHER, 1), holdout=0.1)
    first = [assign(exp, unit, STABLE) for unit in UNITS[:3000]]
    # A rebuilt experiment (a new table with the same salt and weights) gives the same answers.
    again = experiment(("a", STABLE, 1), ("b", CANARY, 1), ("c", OTHER, 1), holdout=0.1)
    assert [assign(again, unit, STABLE) for unit in UNITS[:3000]] == first
    compiled = CompiledExperiment.of(exp)
    names = [v.name for v in exp.variants]
    for unit, (name, _target) in zip(UNITS[:3000], first, strict=True):
        index = compiled.index(unit)
        assert (names[index] if index >= 0 else HOLDOUT_VARIANT) == name


def test_split_matches_weights_chi_square() -> None:
    exp = experiment(("a", STABLE, 0.5), ("b", CANARY, 0.3), ("c", OTHER, 0.2))
    counts = Counter(assign(exp, unit, STABLE)[0] for unit in UNITS)
    observed = [counts["a"], counts["b"], counts["c"]]
    expected = [0.5 * len(UNITS), 0.3 * len(UNITS), 0.2 * len(UNITS)]
    assert sum(observed) == len(UNITS)
    assert chisquare(observed, expected).pvalue > 0.001


def test_split_with_holdout_chi_square_and_targets() -> None:
    exp = experiment(("control", STABLE, 1.0), ("treatment", CANARY, 1.0), holdout=0.1)
    results = [assign(exp, unit, STABLE) for unit in UNITS]
    counts = Counter(name for name, _ in results)
    observed = [counts["control"], counts["treatment"], counts[HOLDOUT_VARIANT]]
    expected = [0.45 * len(UNITS), 0.45 * len(UNITS), 0.1 * len(UNITS)]
    assert chisquare(observed, expected).pvalue > 0.001
    # Holdout is served by the route's stable target.
    assert {target for name, target in results if name == HOLDOUT_VARIANT} == {STABLE}
    assert {target for name, target in results if name == "treatment"} == {CANARY}


def test_holdout_share_and_position() -> None:
    exp = canary_at(0.5, holdout=0.2)
    compiled = CompiledExperiment.of(exp)
    assert compiled.holdout_start == 8000
    share = sum(assign(exp, unit, STABLE)[0] == HOLDOUT_VARIANT for unit in UNITS) / len(UNITS)
    assert abs(share - 0.2) < 0.01  # ~8 standard deviations at n=100k
    # Holdout buckets are the top of the range, whatever the variants' weights.
    for unit in UNITS[:2000]:
        assert (assign(exp, unit, STABLE)[0] == HOLDOUT_VARIANT) == (bucket("exp-1", unit) >= 8000)


def test_canary_ramp_only_adds_units() -> None:
    steps = [0.01, 0.05, 0.25, 0.5, 1.0]
    members, holdouts = [], []
    for fraction in steps:
        compiled = CompiledExperiment.of(canary_at(fraction, holdout=0.05))  # what the router uses
        indexes = [compiled.index(unit) for unit in UNITS]
        members.append({unit for unit, index in zip(UNITS, indexes, strict=True) if index == 0})
        holdouts.append({unit for unit, index in zip(UNITS, indexes, strict=True) if index == -1})
    for smaller, larger in itertools.pairwise(members):
        assert smaller <= larger
    for fraction, group in zip(steps, members, strict=True):
        assert abs(len(group) / len(UNITS) - fraction * 0.95) < 0.01
    assert all(h == holdouts[0] for h in holdouts)  # holdout never changes during a ramp
    # The pure function agrees with the compiled form.
    exp = canary_at(0.05, holdout=0.05)
    assert {u for u in UNITS[:5000] if assign(exp, u, STABLE)[0] == "canary"} == members[1] & set(UNITS[:5000])


def test_salt_decorrelates_experiments() -> None:
    a = canary_at(0.5)
    b = Experiment("other", "exp-2", a.variants)
    both = sum(
        assign(a, unit, STABLE)[0] == "canary" and assign(b, unit, STABLE)[0] == "canary" for unit in UNITS[:20000]
    )
    assert abs(both / 20000 - 0.25) < 0.02


def test_empty_name_salt_falls_back_to_name() -> None:
    exp = Experiment("by-name", "", (Variant("a", STABLE, 1), Variant("b", CANARY, 1)))
    assert CompiledExperiment.of(exp).bucket("u1") == bucket("by-name", "u1")


def test_bounds_are_exact_and_cover_the_range() -> None:
    assert variant_bounds(canary_at(0.01)) == (100, 10000)
    assert variant_bounds(canary_at(0.25, holdout=0.2)) == (2000, 8000)
    assert variant_bounds(experiment(("a", STABLE, 1), ("b", CANARY, 1), ("c", OTHER, 1))) == (3333, 6667, 10000)
    assert variant_bounds(experiment(("a", STABLE, 0.0), ("b", CANARY, 2.0))) == (0, 10000)


def test_zero_weight_variant_gets_nobody_and_all_zero_means_stable() -> None:
    exp = experiment(("canary", CANARY, 0.0), ("stable", STABLE, 1.0))
    assert {assign(exp, unit, STABLE)[0] for unit in UNITS[:5000]} == {"stable"}
    nobody = experiment(("canary", CANARY, 0.0), ("other", OTHER, 0.0))
    assert {assign(nobody, unit, STABLE) for unit in UNITS[:1000]} == {(STABLE_VARIANT, STABLE)}


def test_full_holdout() -> None:
    exp = canary_at(0.5, holdout=1.0)
    assert {assign(exp, unit, STABLE) for unit in UNITS[:1000]} == {(HOLDOUT_VARIANT, STABLE)}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_shadow_sampling_share_and_determinism(fraction: float) -> None:
    shadow = Shadow("candidate", CANARY, fraction)
    ids = [f"{i:032x}" for i in range(20000)]
    sampled = [shadow_sampled(shadow, pid) for pid in ids]
    assert sampled == [shadow_sampled(shadow, pid) for pid in ids]
    share = sum(sampled) / len(ids)
    if fraction in (0.0, 1.0):
        assert share == fraction
    else:
        assert abs(share - fraction) < 0.02
