"""The bandit rollout's round decision: Thompson share for the next round, and when it ends."""

from __future__ import annotations

import pytest

from services.cli.registry_commands import parse_metric
from services.registry.analysis_gate import GateSettings, bandit_verdict
from services.registry.rollout import metric_label

SETTINGS = GateSettings(bandit=True, bandit_floor=0.05, decision_probability=0.95, min_trials=30)


def test_share_follows_the_posterior_within_the_floor() -> None:
    verdict = bandit_verdict("label_rate[1]", 0.7, {"canary": 21, "stable": 15}, {"canary": 40, "stable": 40}, SETTINGS)
    assert not verdict.rollback and not verdict.promote
    assert verdict.canary_weight == pytest.approx(0.7) and verdict.prob_canary_best == pytest.approx(0.7)
    assert "canary 21/40" in verdict.reasons[0] and "next canary share 70.0%" in verdict.reasons[0]
    sure = bandit_verdict("m", 0.999, {"canary": 5, "stable": 1}, {"canary": 10, "stable": 10}, SETTINGS)
    assert sure.canary_weight == pytest.approx(0.95)  # 1 - floor: stable keeps some traffic
    assert not sure.promote  # 10 trials per arm is below min_trials: no decision yet


def test_decides_only_with_enough_feedback_in_both_arms() -> None:
    win = bandit_verdict("m", 0.97, {"canary": 30, "stable": 20}, {"canary": 50, "stable": 50}, SETTINGS)
    assert win.promote and not win.rollback
    lose = bandit_verdict("m", 0.02, {"canary": 20, "stable": 30}, {"canary": 50, "stable": 50}, SETTINGS)
    assert lose.rollback and "stable is better" in lose.reasons[0]
    assert lose.canary_weight == pytest.approx(0.05)
    thin = bandit_verdict("m", 0.999, {"canary": 29, "stable": 10}, {"canary": 29, "stable": 300}, SETTINGS)
    assert not thin.promote and not thin.rollback


def test_lower_is_better_turns_the_probability_around() -> None:
    settings = GateSettings(bandit=True, lower_is_better=True, min_trials=1)
    verdict = bandit_verdict("m", 0.01, {"canary": 1, "stable": 9}, {"canary": 50, "stable": 50}, settings)
    assert verdict.promote and verdict.prob_canary_best == pytest.approx(0.99)


def test_metric_spec_from_the_command_line_and_its_label() -> None:
    assert parse_metric("label_rate:1").value == "1"
    spec = parse_metric("mean:time_to_first_token_ms")
    assert (spec.kind, spec.column) == ("mean", "time_to_first_token_ms")
    assert metric_label({"kind": "label_rate", "value": "1"}) == "label_rate[1]"
    assert metric_label({"kind": "mean", "column": "latency_ms"}) == "mean(latency_ms)"
    assert metric_label({"kind": "outcome_rate", "value": "bought", "name": "conversion"}) == "conversion"
