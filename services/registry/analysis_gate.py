"""Rollout gates fed by the analysis service: verdicts computed in ClickHouse from logged events.

At each step the controller asks the Drift service to analyse the rollout's experiment over the
step's window: a sample-ratio mismatch halts the rollout (the data cannot be trusted, a human
looks), a guardrail metric that is worse on the canary with the sequential test's confidence
rolls it back, anything else lets the router-counter judges decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api import drift_pb2, drift_pb2_grpc
from services.registry.rollout import CANARY_VARIANT, Judgement, StepWindow

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


class AnalysisGate:
    """One per rollout: the experiment and split come from the routing table the registry built."""

    def __init__(self, channel: grpc.aio.Channel, model: str, experiment: str, settings: GateSettings) -> None:
        self.stub = drift_pb2_grpc.DriftStub(channel)
        self.model = model
        self.experiment = experiment
        self.settings = settings

    async def judge(self, window: StepWindow) -> Judgement:
        start = Timestamp()
        start.FromNanoseconds(int(window.started_unix * 1e9))
        request = drift_pb2.AnalyzeExperimentRequest(
            model=self.model,
            experiment=self.experiment,
            window=drift_pb2.TimeWindow(start=start),
            control_variant="stable",
            expected_weights={CANARY_VARIANT: window.fraction, "stable": 1.0 - window.fraction},
            metrics=list(GUARDRAILS),
            alpha=self.settings.alpha,
            sequential=True,
            srm_threshold=self.settings.srm_threshold,
        )
        try:
            response = await self.stub.AnalyzeExperiment(request, timeout=self.settings.timeout_s)
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
        reasons = []
        for result in response.results:
            if result.treatment_variant == CANARY_VARIANT and result.decision == "increase":
                p = result.always_valid_p_value if result.HasField("always_valid_p_value") else result.p_value
                reasons.append(
                    f"{result.metric} worse on the canary: {result.treatment_value:.4g} vs {result.control_value:.4g} "
                    f"(difference {result.estimate:.4g}, {1 - self.settings.alpha:.0%} confidence sequence "
                    f"[{result.ci_low:.4g}, {result.ci_high:.4g}], always-valid p={p:.3g})"
                )
        return Judgement(bool(reasons), reasons)
