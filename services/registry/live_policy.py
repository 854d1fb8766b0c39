"""Promotion policies where the registry uses them: on an evaluation report, and at each canary step."""

from __future__ import annotations

from services.common import errors
from services.registry.evaluation_report import EvaluationReport
from services.registry.fleet import Traffic
from services.registry.live_metrics import LiveMetrics
from services.registry.policy import Policy, PolicyDecision, PolicyError, parse_policy
from services.registry.rollout import Judgement, StepWindow


def parse_or_invalid(policy_yaml: str) -> Policy:
    try:
        return parse_policy(policy_yaml, source="policy_yaml")
    except PolicyError as exc:
        raise errors.InvalidArgument(f"policy_yaml: {exc}") from exc


def evaluate_report(policy_yaml: str, report_yaml: str) -> PolicyDecision:
    policy = parse_or_invalid(policy_yaml)
    try:
        report = EvaluationReport.from_yaml(report_yaml)
    except (ValueError, TypeError) as exc:
        raise errors.InvalidArgument(f"report_yaml: {exc}") from exc
    return policy.evaluate(report)


def _live(variant: str, traffic: Traffic, baseline: LiveMetrics | None = None) -> LiveMetrics:
    return LiveMetrics(
        variant=variant,
        requests=traffic.requests,
        errors=traffic.failed,
        latency_p95_ms=traffic.latency_quantile_ms(0.95) if traffic.requests else None,
        baseline=baseline,
    )


class LivePolicyJudge:
    """Every blocking rule of the policy must pass on the canary's live metrics of the step."""

    def __init__(self, policy_yaml: str) -> None:
        self.policy = parse_or_invalid(policy_yaml)

    def judge(self, window: StepWindow) -> Judgement:
        canary = _live("canary", window.canary, baseline=_live("stable", window.stable))
        decision = self.policy.evaluate(canary)
        reasons = [f"policy rule {r.rule!r}: {r.verdict} ({r.detail})" for r in decision.blocking]
        return Judgement(bool(reasons), reasons)
