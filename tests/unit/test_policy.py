"""Promotion policy engine: parsing, statistics, evaluation against reports and live metrics."""

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from scipy.stats import binom, norm
from statsmodels.stats.proportion import proportion_confint

from services.registry.estimates import (
    Estimate,
    MetricRef,
    MetricSource,
    check_regression,
    decrease_p_value,
    mcnemar_exact_p,
    two_proportion_delta,
    wilson,
)
from services.registry.evaluation_report import EvaluationReport
from services.registry.live_metrics import LiveMetrics
from services.registry.policy import (
    ComparisonRule,
    NoRegressionsRule,
    PolicyError,
    evaluate,
    load_policy,
    parse_expression,
    parse_policy,
)

ROOT = Path(__file__).resolve().parents[2]
POLICY_PATH = ROOT / "examples/policies/promotion.yaml"
REPORT_PATH = ROOT / "examples/reports/eval_report.yaml"


def example_report_data() -> dict[str, Any]:
    return yaml.safe_load(REPORT_PATH.read_text())


def report_from(data: dict[str, Any]) -> EvaluationReport:
    return EvaluationReport.model_validate(data)


def hand_wilson(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    z = norm.ppf(1 - (1 - confidence) / 2)
    p = count / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


# --- statistics -------------------------------------------------------------------------------


def test_wilson_matches_hand_formula_and_statsmodels() -> None:
    est = wilson(272, 400)
    lo, hi = hand_wilson(272, 400)
    assert est.point == pytest.approx(0.68)
    assert est.lower_ci == pytest.approx(lo, abs=1e-12)
    assert est.upper_ci == pytest.approx(hi, abs=1e-12)
    assert (est.lower_ci, est.upper_ci) == pytest.approx(proportion_confint(272, 400, alpha=0.05, method="wilson"))
    assert est.lower_ci == pytest.approx(0.63276, abs=1e-5)  # published-table value for 272/400
    assert est.n == 400 and est.p_value is None


def test_wilson_edges_and_confidence_level() -> None:
    zero = wilson(0, 10)
    assert zero.lower_ci == 0.0 and zero.upper_ci == pytest.approx(hand_wilson(0, 10)[1])
    assert wilson(10, 10).upper_ci == 1.0
    narrow, wide = wilson(50, 100, 0.90), wilson(50, 100, 0.99)
    assert wide.lower_ci < narrow.lower_ci and wide.upper_ci > narrow.upper_ci
    with pytest.raises(ValueError):
        wilson(1, 0)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_delta_newcombe_interval_and_two_sided_z_test_by_hand() -> None:
    est = two_proportion_delta(272, 400, 220, 400)
    assert est.point == pytest.approx(0.13)
    # Newcombe hybrid score interval from the two Wilson intervals.
    l1, u1 = hand_wilson(272, 400)
    l2, u2 = hand_wilson(220, 400)
    p1, p2 = 0.68, 0.55
    assert est.lower_ci == pytest.approx(0.13 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), abs=1e-9)
    assert est.upper_ci == pytest.approx(0.13 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2), abs=1e-9)
    # Pooled two-proportion z-test, two-sided.
    pooled = (272 + 220) / 800
    z = 0.13 / math.sqrt(pooled * (1 - pooled) * (1 / 400 + 1 / 400))
    assert est.p_value == pytest.approx(2 * norm.sf(z), rel=1e-9)
    assert est.p_value == pytest.approx(1.579e-4, rel=1e-3)
    assert est.n == 400
    # Swapping arms flips the sign, not the p-value (two-sided).
    swapped = two_proportion_delta(220, 400, 272, 400)
    assert swapped.point == pytest.approx(-0.13) and swapped.p_value == pytest.approx(est.p_value)


def test_delta_when_no_difference_is_observable() -> None:
    est = two_proportion_delta(50, 50, 80, 80)
    assert est.point == 0 and est.p_value == 1.0
    assert est.lower_ci is not None and est.lower_ci < 0 < est.upper_ci


def test_decrease_p_value_is_one_sided() -> None:
    pooled = (516 + 552) / 1200
    z = (516 / 600 - 552 / 600) / math.sqrt(pooled * (1 - pooled) * (2 / 600))
    assert decrease_p_value(516, 600, 552, 600) == pytest.approx(norm.cdf(z), rel=1e-9)
    assert decrease_p_value(552, 600, 516, 600) > 0.99  # an increase is not a decrease
    assert decrease_p_value(0, 10, 0, 10) == 1.0


def test_mcnemar_exact_p() -> None:
    # 1 regression vs 7 improvements: two-sided binomial(8, 0.5) tail.
    assert mcnemar_exact_p(1, 7) == pytest.approx(2 * binom.cdf(1, 8, 0.5))
    assert mcnemar_exact_p(0, 0) == 1.0


# --- parsing ----------------------------------------------------------------------------------


def test_parses_every_rule_of_the_example_policy() -> None:
    policy = load_policy(POLICY_PATH)
    assert policy.name == "promotion" and policy.confidence == 0.95 and policy.effective_alpha == 0.05
    texts = [rule.text for rule in policy.rules]
    assert texts == [
        "aggregate.success@1.lower_ci >= 0.82",
        "no_regressions_on: [headache_redflags, debug_search_api]",
        "rule_violation_rate(headache_redflags).point <= 0.05",
        "delta.success@1(division_hard).point >= 0.07",
        "delta.success@1(division_hard).p_value < 0.05",
        "latency_p95_ms.point <= 900",
        "cost_per_1k_tokens_usd.point <= 0.020",
    ]
    first = policy.rules[0]
    assert isinstance(first, ComparisonRule)
    assert first.comparison.ref == MetricRef("success@1", "aggregate")
    assert (first.comparison.field, first.comparison.op, first.comparison.threshold) == ("lower_ci", ">=", 0.82)
    regressions = policy.rules[1]
    assert isinstance(regressions, NoRegressionsRule)
    assert regressions.slices == ("headache_redflags", "debug_search_api") and regressions.mode == "auto"
    refs = [rule.comparison.ref for rule in policy.rules if isinstance(rule, ComparisonRule)]
    assert refs[1:] == [
        MetricRef("rule_violation_rate", "candidate", "headache_redflags"),
        MetricRef("success@1", "delta", "division_hard"),
        MetricRef("success@1", "delta", "division_hard"),
        MetricRef("latency_p95_ms"),
        MetricRef("cost_per_1k_tokens_usd"),
    ]


def test_expression_forms() -> None:
    c = parse_expression("delta.success@5('slice with spaces').lower_ci>-0.02")
    assert c.ref == MetricRef("success@5", "delta", "slice with spaces")
    assert (c.field, c.op, c.threshold) == ("lower_ci", ">", -0.02)
    assert parse_expression("  error_rate . upper_ci  <=  1e-2 ").threshold == 0.01
    assert parse_expression("delta.success@1.point != 0").ref == MetricRef("success@1", "delta")
    assert parse_expression("success@1(math-basic).n == 400").ref.slice == "math-basic"
    assert str(parse_expression("delta.success@1(division_hard).p_value<0.05")) == (
        "delta.success@1(division_hard).p_value < 0.05"
    )


BAD_RULES = [
    ("aggregate.success@1.lowr_ci >= 0.82", "unknown metric field 'lowr_ci'"),
    ("success_rate(math_basic).point >= 0.9", "unknown function 'success_rate'"),
    ("latency_p95_ms(math_basic).point <= 900", "unknown function 'latency_p95_ms'"),
    ("aggregat.success@1.point >= 0.8", "unknown prefix 'aggregat'"),
    ("latency_p95_ms.point => 900", "bad operator '=>'"),
    ("latency_p95_ms.point = 900", "bad operator '='"),
    ("latency_p95_ms.point <=", "missing number after '<='"),
    ("latency_p95_ms.point <= fast", "threshold must be a number, got 'fast'"),
    ("latency_p95_ms.point 900", "expected a comparison operator"),
    ("latency_p95_ms.point", "missing comparison operator"),
    ("latency_p95_ms <= 900", "missing field: write latency_p95_ms.point"),
    ("success@1(math_basic).p_value < 0.05", "p_value exists only for delta"),
    ("success@1.point >= 0.9", "success@1 needs a slice"),
    ("aggregate.success@1(math_basic).point >= 0.9", "aggregate. pools all slices"),
    ("aggregate.latency_p95_ms.point <= 900", "aggregate. applies to count metrics"),
    ("success@top(math_basic).point >= 0.9", "bad metric name 'success@top'"),
    ("success@1(math_basic.point >= 0.9", "expected ')'"),
    ("success@1().point >= 0.9", "expected a slice name"),
    ("latency_p95_ms.point <= 900 ms", "unexpected 'ms' after the threshold"),
    ("latency_p95_ms.point <= 90%", "unexpected character '%'"),
    ("a.b.c.point >= 1", "too many '.' parts"),
    ("", "empty rule"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_RULES)
def test_malformed_rule_error_names_the_rule(bad: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy({"name": "p", "rules": ["latency_p95_ms.point <= 900", {"rule": bad, "name": "the bad one"}]})
    error = caught.value
    assert error.index == 1
    assert error.rule == bad
    assert message in error.message
    assert "rules[1]" in str(error) and message in str(error)


def test_syntax_error_reports_the_column() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_expression("latency_p95_ms.point => 900")
    assert caught.value.column == 22


BAD_STRUCTURES: list[tuple[Any, int | None, str]] = [
    ("rules: not-a-list", None, "rules must be a list"),
    ("name: p", None, "rules must be a list of rules, got nothing"),
    ("rules: []", None, "rules is empty"),
    ("rules: [unclosed", None, "not valid YAML"),
    ("42", None, "a policy must be a mapping"),
    ({"rules": ["latency_p95_ms.point <= 1"], "threshold": 1}, None, "unknown policy key 'threshold'"),
    ({"rules": ["latency_p95_ms.point <= 1"], "confidence": 95}, None, "confidence must be a number between 0 and 1"),
    ({"rules": [42]}, 0, "a rule must be a string or a mapping"),
    ({"rules": [{"rule": "latency_p95_ms.point <= 1", "severity": "fatal"}]}, 0, "severity must be block or warn"),
    ({"rules": [{"rule": "latency_p95_ms.point <= 1", "when": "always"}]}, 0, "unknown key 'when'"),
    ({"rules": [{"latency_p95_ms.point <= 1": None}]}, 0, "needs rule or no_regressions_on"),
    ({"rules": [{"no_regressions_on": "math_basic"}]}, 0, "no_regressions_on must be a non-empty list"),
    ({"rules": [{"no_regressions_on": []}]}, 0, "no_regressions_on must be a non-empty list"),
    ({"rules": [{"no_regressions_on": ["a"], "mode": "bayes"}]}, 0, "mode must be auto, paired or test"),
    ({"rules": [{"no_regressions_on": ["a"], "metrics": ["accuracy"]}]}, 0, "'accuracy' is not a pass metric"),
    ({"rules": [{"no_regressions_on": ["a"], "max_regressions": -1}]}, 0, "max_regressions must be an integer"),
    ({"rules": [{"no_regressions_on": ["a"], "slices": ["b"]}]}, 0, "unknown key 'slices'"),
    ({"rules": [{"no_regressions_on": ["a"], "rule": "x.point > 1"}]}, 0, "not both"),
]


@pytest.mark.parametrize(("data", "index", "message"), BAD_STRUCTURES)
def test_malformed_policy_structure(data: Any, index: int | None, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    assert caught.value.index == index
    assert message in caught.value.message


def test_load_policy_error_names_file_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - latency_p95_ms.point <= 900\n  - delta.success@1(x).pvalue < 0.05\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    text = str(caught.value)
    assert str(path) in text and "rules[1]" in text and "delta.success@1(x).pvalue < 0.05" in text
    assert "unknown metric field 'pvalue'" in text


def test_bare_list_is_a_policy() -> None:
    policy = parse_policy("- latency_p95_ms.point <= 900\n- {rule: 'error_rate.upper_ci < 0.01', severity: warn}\n")
    assert policy.name == "policy" and len(policy.rules) == 2 and policy.rules[1].severity == "warn"


# --- evaluation against the example report ------------------------------------------------------


def test_example_policy_on_example_report_is_go() -> None:
    decision = evaluate(load_policy(POLICY_PATH), EvaluationReport.load(REPORT_PATH))
    assert decision.go
    assert [r.verdict for r in decision.rules] == ["pass"] * 7
    assert decision.blocking == [] and decision.counts["pass"] == 7
    by_index = {r.index: r for r in decision.rules}
    assert by_index[0].value == pytest.approx(hand_wilson(564 + 1128 + 272 + 430, 2700)[0])
    assert by_index[1].value == 0 and {c.method for c in by_index[1].regressions} == {"test"}
    assert {(c.slice, c.metric) for c in by_index[1].regressions} == {
        ("headache_redflags", "success@1"),
        ("debug_search_api", "success@1"),
        ("debug_search_api", "success@5"),
    }
    assert by_index[2].value == pytest.approx(12 / 600)
    assert by_index[3].value == pytest.approx(0.13)
    assert by_index[4].value == pytest.approx(1.579e-4, rel=1e-3)
    assert by_index[5].value == 780 and by_index[6].value == 0.016
    payload = json.loads(json.dumps(decision.to_dict()))
    assert payload["decision"] == "go" and len(payload["rules"]) == 7
    assert payload["rules"][3]["estimate"]["p_value"] == pytest.approx(1.579e-4, rel=1e-3)
    text = decision.to_text()
    assert text.startswith("policy promotion: GO")
    for rule in decision.rules:
        assert rule.rule in text


def test_degraded_candidate_is_no_go_and_lists_failing_rules() -> None:
    data = example_report_data()
    data["candidate"]["operational"]["latency_p95_ms"] = 1100
    data["slices"]["headache_redflags"]["candidate"] = {"n": 600, "passes": {"success@1": 516}, "rule_violations": 40}
    data["slices"]["division_hard"]["candidate"]["passes"]["success@1"] = 236  # 0.59 vs 0.55
    decision = evaluate(load_policy(POLICY_PATH), report_from(data))
    assert not decision.go
    verdicts = {r.index: r.verdict for r in decision.rules}
    assert verdicts == {0: "pass", 1: "fail", 2: "fail", 3: "fail", 4: "fail", 5: "fail", 6: "pass"}
    assert [r.index for r in decision.blocking] == [1, 2, 3, 4, 5]
    regression = decision.rules[1]
    assert regression.value == 1
    assert "REGRESSED headache_redflags/success@1" in regression.detail
    text = decision.to_text()
    assert text.startswith("policy promotion: NO-GO")
    assert "blocking: rules[1]" in text and "FAIL" in text


def test_missing_operational_metric_is_no_go() -> None:
    data = example_report_data()
    del data["candidate"]["operational"]["cost_per_1k_tokens_usd"]
    decision = evaluate(load_policy(POLICY_PATH), report_from(data))
    assert not decision.go
    cost = decision.rules[6]
    assert cost.verdict == "missing" and cost.value is None and "cost_per_1k_tokens_usd" in cost.detail
    assert [r.index for r in decision.blocking] == [6]


def test_missing_baseline_makes_delta_rules_missing() -> None:
    data = example_report_data()
    del data["slices"]["division_hard"]["baseline"]
    decision = evaluate(load_policy(POLICY_PATH), report_from(data))
    assert not decision.go
    assert [(r.index, r.verdict) for r in decision.blocking] == [(3, "missing"), (4, "missing")]


def test_unknown_slice_is_an_error_naming_the_rule() -> None:
    policy = parse_policy(
        {
            "rules": [
                "latency_p95_ms.point <= 900",
                "delta.success@1(division_hrd).point >= 0.07",
                {"no_regressions_on": ["math_basic", "headache_red_flags"]},
            ]
        }
    )
    report = EvaluationReport.load(REPORT_PATH)
    decision = evaluate(policy, report)
    assert not decision.go
    assert [r.verdict for r in decision.rules] == ["pass", "error", "error"]
    assert "unknown slice 'division_hrd'" in decision.rules[1].detail and "division_hard" in decision.rules[1].detail
    assert "unknown slice 'headache_red_flags'" in decision.rules[2].detail
    with pytest.raises(PolicyError) as caught:
        evaluate(policy, report, strict=True)
    assert caught.value.index == 1 and caught.value.rule == "delta.success@1(division_hrd).point >= 0.07"
    assert "unknown slice 'division_hrd'" in str(caught.value)


def test_interval_of_a_point_only_metric_is_an_error_naming_the_rule() -> None:
    policy = parse_policy({"rules": ["latency_p95_ms.lower_ci <= 900"]})
    report = EvaluationReport.load(REPORT_PATH)
    result = evaluate(policy, report).rules[0]
    assert result.verdict == "error" and "point-only" in result.detail
    with pytest.raises(PolicyError) as caught:
        evaluate(policy, report, strict=True)
    assert caught.value.index == 0 and caught.value.rule == "latency_p95_ms.lower_ci <= 900"
    assert "has no lower_ci" in caught.value.message


def test_operational_value_with_interval_and_operational_delta() -> None:
    data = example_report_data()
    data["candidate"]["operational"]["latency_p95_ms"] = {"point": 780, "lower_ci": 740, "upper_ci": 830, "n": 5000}
    policy = parse_policy({"rules": ["latency_p95_ms.upper_ci <= 900", "delta.latency_p95_ms.point <= 0"]})
    decision = evaluate(policy, report_from(data))
    assert decision.go
    assert [r.value for r in decision.rules] == [830, -40]


def test_aggregate_pools_only_slices_reporting_the_metric_and_delta_pools_both_arms() -> None:
    report = EvaluationReport.load(REPORT_PATH)
    at5 = report.resolve(MetricRef("success@5", "aggregate"), 0.95)
    assert at5.point == pytest.approx(470 / 500) and at5.n == 500 and "pooled over 1 slice" in at5.method
    pooled = report.resolve(MetricRef("success@1", "delta"), 0.95)
    expected = two_proportion_delta(2394, 2700, 552 + 1104 + 220 + 420, 2700)
    assert pooled.point == pytest.approx(expected.point) and pooled.p_value == pytest.approx(expected.p_value)
    violations = report.resolve(MetricRef("rule_violation_rate", "aggregate"), 0.95)
    assert violations.point == pytest.approx((12 + 5 + 3 + 4) / 2700)


def test_comparison_operators() -> None:
    report = EvaluationReport.load(REPORT_PATH)
    rules = [
        "success@1(division_hard).n == 400",
        "success@1(division_hard).n != 401",
        "success@1(division_hard).point > 0.67",
        "success@1(division_hard).point < 0.69",
        "success@1(division_hard).point < 0.68",
    ]
    decision = evaluate(parse_policy({"rules": rules}), report)
    assert [r.verdict for r in decision.rules] == ["pass", "pass", "pass", "pass", "fail"]


def test_warn_rules_are_reported_but_do_not_block() -> None:
    policy = parse_policy(
        {
            "rules": [
                "latency_p95_ms.point <= 900",
                {"rule": "latency_p95_ms.point <= 500", "name": "stretch", "severity": "warn"},
            ]
        }
    )
    decision = evaluate(policy, EvaluationReport.load(REPORT_PATH))
    assert decision.go
    assert [r.name for r in decision.warnings] == ["stretch"] and decision.rules[1].verdict == "fail"
    assert "FAIL (warn)" in decision.to_text()


# --- no_regressions_on --------------------------------------------------------------------------


def paired_report(candidate_fails: tuple[str, ...], *, candidate_fixes: tuple[str, ...] = ()) -> EvaluationReport:
    ids = [f"case-{i:02d}" for i in range(20)]
    baseline = {case: {"success@1": case not in ("case-18", "case-19")} for case in ids}
    candidate = {
        case: {"success@1": (baseline[case]["success@1"] or case in candidate_fixes) and case not in candidate_fails}
        for case in ids
    }
    return report_from(
        {"slices": {"headache_redflags": {"baseline": {"cases": baseline}, "candidate": {"cases": candidate}}}}
    )


def test_no_regressions_paired_branch_counts_broken_cases() -> None:
    policy = parse_policy({"rules": [{"no_regressions_on": ["headache_redflags"]}]})
    clean = evaluate(policy, paired_report((), candidate_fixes=("case-18",)))
    assert clean.go and clean.rules[0].regressions[0].method == "paired"
    assert clean.rules[0].regressions[0].improvements == 1

    # One case broken, one fixed: pass rates are equal, but the paired definition still catches it.
    broken = evaluate(policy, paired_report(("case-03",), candidate_fixes=("case-18",)))
    assert not broken.go
    check = broken.rules[0].regressions[0]
    assert check.regressed and check.regressions == 1 and check.case_ids == ("case-03",)
    assert check.baseline_rate == check.candidate_rate == 0.9
    assert check.p_value == pytest.approx(mcnemar_exact_p(1, 1))
    assert "case-03" in broken.rules[0].detail and "McNemar" in broken.rules[0].detail

    tolerant = parse_policy({"rules": [{"no_regressions_on": ["headache_redflags"], "max_regressions": 1}]})
    assert evaluate(tolerant, paired_report(("case-03",))).go
    assert not evaluate(tolerant, paired_report(("case-03", "case-07"))).go


def test_no_regressions_test_branch_uses_one_sided_test() -> None:
    data = example_report_data()
    policy = parse_policy({"rules": [{"no_regressions_on": ["headache_redflags"]}]})
    # A dip within noise: 0.92 -> 0.91 on 600 cases.
    data["slices"]["headache_redflags"]["candidate"]["passes"]["success@1"] = 546
    dip = evaluate(policy, report_from(data)).rules[0]
    assert dip.verdict == "pass" and dip.regressions[0].method == "test"
    assert dip.regressions[0].p_value == pytest.approx(decrease_p_value(546, 600, 552, 600))
    assert dip.regressions[0].p_value > 0.05
    # A significant drop: 0.92 -> 0.86.
    data["slices"]["headache_redflags"]["candidate"]["passes"]["success@1"] = 516
    drop = evaluate(policy, report_from(data)).rules[0]
    assert drop.verdict == "fail" and drop.regressions[0].p_value < 0.05
    # A stricter alpha on the rule lets the same drop through only if p >= alpha.
    lenient = parse_policy({"rules": [{"no_regressions_on": ["headache_redflags"], "alpha": 1e-6}]})
    assert evaluate(lenient, report_from(data)).go


def test_no_regressions_mode_forcing() -> None:
    # test mode on per-case data ignores the pairing: equal rates -> no regression.
    report = paired_report(("case-03",), candidate_fixes=("case-18",))
    forced = parse_policy({"rules": [{"no_regressions_on": ["headache_redflags"], "mode": "test"}]})
    assert evaluate(forced, report).go
    # paired mode on counts only cannot decide -> missing -> no-go.
    paired = parse_policy({"rules": [{"no_regressions_on": ["math_basic"], "mode": "paired"}]})
    result = evaluate(paired, EvaluationReport.load(REPORT_PATH))
    assert not result.go and result.rules[0].verdict == "missing"
    assert "per-case results" in result.rules[0].detail


def test_no_regressions_with_explicit_metric_missing_in_slice() -> None:
    policy = parse_policy({"rules": [{"no_regressions_on": ["math_basic"], "metrics": ["success@5"]}]})
    result = evaluate(policy, EvaluationReport.load(REPORT_PATH)).rules[0]
    assert result.verdict == "missing" and "success@5" in result.detail


def test_check_regression_directly() -> None:
    from services.registry.estimates import ArmComparison

    check = check_regression(ArmComparison(80, 100, 90, 100), "s", "success@1", alpha=0.05)
    assert check.method == "test" and check.regressed
    assert check.p_value == pytest.approx(decrease_p_value(80, 100, 90, 100))


# --- live metrics -------------------------------------------------------------------------------


CANARY_POLICY = {
    "name": "canary",
    "rules": [
        "requests.point >= 1000",
        "latency_p95_ms.point <= 900",
        "error_rate.upper_ci <= 0.01",
        "delta.error_rate.point <= 0.002",
        "delta.latency_p95_ms.point <= 50",
    ],
}


def live(errors: int = 3, latency: float = 640.0, requests: int = 5000) -> LiveMetrics:
    stable = LiveMetrics(variant="stable", requests=45000, errors=36, latency_p95_ms=610.0)
    return LiveMetrics(variant="canary", requests=requests, errors=errors, latency_p95_ms=latency, baseline=stable)


def test_live_metrics_source_go() -> None:
    source = live()
    assert isinstance(source, MetricSource) and isinstance(EvaluationReport.load(REPORT_PATH), MetricSource)
    decision = evaluate(parse_policy(CANARY_POLICY), source)
    assert decision.go, decision.to_text()
    error_rate = decision.rules[2]
    assert error_rate.value == pytest.approx(hand_wilson(3, 5000)[1])
    assert error_rate.estimate is not None and error_rate.estimate.point == pytest.approx(3 / 5000)
    assert decision.rules[3].estimate is not None
    assert decision.rules[3].estimate.p_value == pytest.approx(two_proportion_delta(3, 5000, 36, 45000).p_value)
    assert decision.rules[4].value == pytest.approx(30)


def test_live_metrics_no_go_on_errors_and_latency() -> None:
    # 40 errors in 5000 = 0.8%, but the 95% upper bound exceeds 1%.
    decision = evaluate(parse_policy(CANARY_POLICY), live(errors=40, latency=950))
    assert not decision.go
    assert [r.index for r in decision.blocking] == [1, 2, 3, 4]


def test_live_metrics_missing_data_is_no_go() -> None:
    source = LiveMetrics(variant="canary", requests=0)
    decision = evaluate(parse_policy(CANARY_POLICY), source)
    assert not decision.go
    assert [r.verdict for r in decision.rules] == ["fail", "missing", "missing", "missing", "missing"]
    # The offline promotion policy against live metrics: nothing it needs is there, so no-go.
    offline = evaluate(load_policy(POLICY_PATH), live())
    assert not offline.go
    verdicts = [r.verdict for r in offline.rules]
    assert verdicts == ["missing", "missing", "missing", "missing", "missing", "pass", "missing"]
    assert "no evaluation slices" in offline.rules[1].detail


def test_live_metrics_reject_impossible_counts() -> None:
    with pytest.raises(ValueError):
        LiveMetrics(variant="x", requests=5, errors=6)


# --- report model -------------------------------------------------------------------------------


def test_report_derives_counts_from_cases_and_checks_them() -> None:
    report = report_from({"slices": {"s": {"candidate": {"cases": {1: {"success@1": True}, 2: {"success@1": False}}}}}})
    arm = report.slices["s"].candidate
    assert arm.n == 2 and arm.passes == {"success@1": 1} and arm.cases is not None and set(arm.cases) == {"1", "2"}
    with pytest.raises(ValidationError, match="passes\\[success@1\\] = 2 but cases give 1"):
        report_from(
            {
                "slices": {
                    "s": {
                        "candidate": {
                            "passes": {"success@1": 2},
                            "cases": {"a": {"success@1": True}, "b": {"success@1": False}},
                        }
                    }
                }
            }
        )
    with pytest.raises(ValidationError, match="outside"):
        report_from({"slices": {"s": {"candidate": {"n": 10, "passes": {"success@1": 11}}}}})
    with pytest.raises(ValidationError, match="name@k"):
        report_from({"slices": {"s": {"candidate": {"n": 10, "passes": {"accuracy": 5}}}}})
    with pytest.raises(ValidationError, match="give n"):
        report_from({"slices": {"s": {"candidate": {"passes": {}}}}})
    with pytest.raises(ValidationError):
        report_from({"slices": {}})


def test_estimate_field_access() -> None:
    est = Estimate(point=0.5, lower_ci=0.4, upper_ci=0.6, n=100)
    assert est.get("lower_ci") == 0.4 and est.get("p_value") is None
    with pytest.raises(KeyError):
        est.get("median")
    assert copy.deepcopy(est) == est
