"""Rollout gates fed by the analysis service: verdicts computed in ClickHouse from logged events.

At each step the controller asks the Drift service to analyse the rollout's experiment over the
step's window: a sample-ratio mismatch halts the rollout (the data cannot be trusted, a human
looks), a guardrail metric that is worse on the canary with the sequential test's confidence
rolls it back, and a significant win on the primary metric (with no guardrail worse) promotes it.
Anything else lets the router-counter judges decide.

Bandit rollouts also weigh the arms: the Thompson weights of the primary metric (a feedback rate)
over everything logged since the rollout began set the canary's share for the next round, and a
posterior probability past the decision threshold ends the rollout either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api import drift_pb2, drift_pb2_grpc
from services.registry.rollout import CANARY_VARIANT, Judgement, StepWindow, metric_label

log = logging.getLogger(__name__)

# Guardrails: for each, an increase on the canary is bad. Mean latency has far more power than
# the p95 under a sequential test; both are watched.
GUARDRAILS = (
    drift_pb2.MetricSpec(kind="error_rate", name="error_rate"),
    drift_pb2.MetricSpec(kind="mean", name="latency_mean_ms", column="latency_ms"),
    drift_pb2.MetricSpec(kind="quantile", name="latency_p95_ms", column="latency_ms", quantile=0.95),
)


@dataclass(frozen=True, slots=True)
class GateSettings:
    alpha: float = 0.05
    srm_threshold: float = 0.001
    timeout_s: float = 10.0
    primary_metric: dict[str, Any] | None = None  # MetricSpec fields
    lower_is_better: bool = False
    bandit: bool = False
    bandit_floor: float = 0.05
    decision_probability: float = 0.95
    min_trials: int = 30  # bandit: feedback per arm before the posterior may end the rollout


class AnalysisGate:
    """One per rollout: the experiment and split come from the routing table the registry built."""

    def __init__(self, channel: grpc.aio.Channel, model: str, experiment: str, settings: GateSettings) -> None:
        self.stub = drift_pb2_grpc.DriftStub(channel)
        self.model = model
        self.experiment = experiment
        self.settings = settings
        primary = settings.primary_metric
        self.primary = (
            drift_pb2.MetricSpec(**{**primary, "name": metric_label(primary)}) if primary else None
        )

    async def _analyze(self, request: drift_pb2.AnalyzeExperimentRequest) -> drift_pb2.AnalyzeExperimentResponse:
        return await self.stub.AnalyzeExperiment(request, timeout=self.settings.timeout_s)

    async def judge(self, window: StepWindow) -> Judgement:
        start = Timestamp()
        start.FromNanoseconds(int(window.started_unix * 1e9))
        metrics = [*GUARDRAILS, *([self.primary] if self.primary else [])]
        request = drift_pb2.AnalyzeExperimentRequest(
            model=self.model,
            experiment=self.experiment,
            window=drift_pb2.TimeWindow(start=start),
            control_variant="stable",
            expected_weights={CANARY_VARIANT: window.fraction, "stable": 1.0 - window.fraction},
            metrics=metrics,
            # Any one of the metrics can end the rollout: Bonferroni keeps the family's error at alpha.
            alpha=self.settings.alpha / len(metrics),
            sequential=True,
            srm_threshold=self.settings.srm_threshold,
        )
        try:
            response = await self._analyze(request)
            allocation = await self._allocate(window) if self.settings.bandit else None
        except grpc.aio.AioRpcError as exc:
            # No verdict is not a pass: the step waits for the next analysis.
            log.warning("analysis of %s unavailable: %s", self.experiment, exc.details())
            return Judgement(False, wait=True, reasons=[f"analysis unavailable: {exc.code().name}"])
        if response.srm.mismatch:
            observed = ", ".join(f"{v.variant} {v.observed_fraction:.3f}" for v in response.variants)
            return Judgement(
                False, halt=True,
                reasons=[f"sample ratio mismatch (p={response.srm.p_value:.2g}; observed {observed}, "
                         f"expected canary {window.fraction:.3f})"],
            )
        reasons, wins = [], []
        primary = self.primary.name if self.primary else None
        better = "decrease" if self.settings.lower_is_better else "increase"
        for result in response.results:
            if result.treatment_variant != CANARY_VARIANT:
                continue
            if result.metric == primary:
                if result.decision == better:
                    wins.append(f"{result.metric} better on the canary: {self._evidence(result)}")
            elif result.decision == "increase":
                reasons.append(f"{result.metric} worse on the canary: {self._evidence(result)}")
        if reasons:
            return Judgement(True, reasons)
        if allocation is not None:
            return allocation
        return Judgement(False, wins, promote=bool(wins))

    def _evidence(self, result: drift_pb2.MetricResult) -> str:
        p = result.always_valid_p_value if result.HasField("always_valid_p_value") else result.p_value
        return (
            f"{result.treatment_value:.4g} vs {result.control_value:.4g} (difference {result.estimate:.4g}, "
            f"{1 - result.alpha:.2%} confidence sequence [{result.ci_low:.4g}, {result.ci_high:.4g}], "
            f"always-valid p={p:.3g})"
        )

    async def _allocate(self, window: StepWindow) -> Judgement:
        """Thompson weights over the whole rollout so far; the split changes by round, so no SRM here."""
        assert self.primary is not None
        start = Timestamp()
        start.FromNanoseconds(int(window.rollout_started_unix * 1e9))
        response = await self._analyze(drift_pb2.AnalyzeExperimentRequest(
            model=self.model, experiment=self.experiment, window=drift_pb2.TimeWindow(start=start),
            control_variant="stable", metrics=[self.primary], alpha=self.settings.alpha,
            analysis_unit="prediction", bandit_floor=self.settings.bandit_floor,
        ))
        for allocation in response.bandit:
            if allocation.metric == self.primary.name and CANARY_VARIANT in allocation.prob_best:
                return bandit_verdict(
                    self.primary.name, allocation.prob_best[CANARY_VARIANT], dict(allocation.successes),
                    dict(allocation.trials), self.settings,
                )
        return Judgement(False, [f"bandit: no feedback on {self.primary.name} in both arms yet"],
                         canary_weight=window.fraction)


def bandit_verdict(
    metric: str, prob_canary_best: float, successes: dict[str, int], trials: dict[str, int], s: GateSettings
) -> Judgement:
    """Next round's canary share is its posterior probability of being better (Thompson sampling),
    kept within [floor, 1 - floor]; with enough feedback in both arms, a probability past the
    decision threshold ends the rollout: promote, or roll back when stable is the better one."""
    p = 1.0 - prob_canary_best if s.lower_is_better else prob_canary_best
    weight = min(max(p, s.bandit_floor), 1.0 - s.bandit_floor)
    counts = ", ".join(f"{v} {successes.get(v, 0)}/{n}" for v, n in sorted(trials.items()))
    summary = f"bandit: P(canary better on {metric}) = {p:.3f} ({counts})"
    if min(trials.values(), default=0) >= s.min_trials:
        if p >= s.decision_probability:
            return Judgement(False, [summary], promote=True, canary_weight=weight, prob_canary_best=p)
        if p <= 1.0 - s.decision_probability:
            return Judgement(True, [f"{summary}; stable is better"], canary_weight=weight, prob_canary_best=p)
    return Judgement(False, [f"{summary}; next canary share {weight:.1%}"], canary_weight=weight,
                     prob_canary_best=p)
