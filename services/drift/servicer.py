"""gRPC transport for mlmesh.v1.Drift: proto <-> DriftService, the work in a thread.

Domain errors (services.common.errors) pass through; the shared server bootstrap maps them.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import errors
from services.common.api import drift_pb2, drift_pb2_grpc
from services.common.server import ServiceRegistration
from services.drift.alerts import DriftScheduler
from services.drift.service import DriftService, MetricSpec, ProfileCreated, resolve_window


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))
    return stamp


def _window(window: drift_pb2.TimeWindow, *, required: bool) -> tuple[datetime | None, datetime | None]:
    start = window.start.ToDatetime(tzinfo=UTC) if window.HasField("start") else None
    end = window.end.ToDatetime(tzinfo=UTC) if window.HasField("end") else None
    return resolve_window(start, end, window.last_minutes, required=required)


def _opt(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _created(created: ProfileCreated) -> drift_pb2.CreateReferenceProfileResponse:
    s = created.stored
    return drift_pb2.CreateReferenceProfileResponse(
        profile_id=s.profile_id,
        model=s.model,
        model_version=s.model_version,
        created_at=_ts(s.created_at),
        rows=s.rows,
        features=[
            drift_pb2.ProfiledFeature(
                feature=f.feature.name, source=f.feature.source, kind=f.feature.kind, n=f.n, bins=f.bins
            )
            for f in created.features
        ],
    )


class DriftServicer(drift_pb2_grpc.DriftServicer):
    def __init__(self, service: DriftService, scheduler: DriftScheduler | None = None) -> None:
        self.service = service
        self.scheduler = scheduler

    async def Stats(
        self, request: drift_pb2.DriftStatsRequest, context: grpc.aio.ServicerContext
    ) -> drift_pb2.DriftStatsResponse:
        if self.scheduler is None:
            return drift_pb2.DriftStatsResponse()
        stats = self.scheduler.stats
        return drift_pb2.DriftStatsResponse(
            ticks=stats.ticks,
            checks_run=stats.checks_run,
            alerts_published=stats.alerts_published,
            failures=stats.failures,
            last_error=stats.last_error,
            interval_s=self.scheduler.settings.schedule_interval_s,
            models=[
                drift_pb2.ModelDriftStatus(
                    model=model,
                    status=report.status,
                    rows=report.rows,
                    window_end=_ts(report.window_end),
                    drifted_features=[f.feature for f in report.features if f.status != "ok"],
                )
                for model, report in sorted(stats.last_reports.items())
            ],
        )

    async def ComputeDrift(
        self, request: drift_pb2.ComputeDriftRequest, context: grpc.aio.ServicerContext
    ) -> drift_pb2.ComputeDriftResponse:
        start, end = _window(request.window, required=True)
        assert start is not None and end is not None
        report = await asyncio.to_thread(
            self.service.compute_drift, request.model, request.model_version, start, end, request.profile_id
        )
        return drift_pb2.ComputeDriftResponse(
            profile_id=report.profile_id,
            window_start=_ts(report.window_start),
            window_end=_ts(report.window_end),
            rows=report.rows,
            status=report.status,
            features=[
                drift_pb2.FeatureDrift(
                    feature=f.feature,
                    source=f.source,
                    kind=f.kind,
                    status=f.status,
                    n_reference=f.n_reference,
                    n_current=f.n_current,
                    missing=f.missing,
                )
                for f in report.features
            ],
            results=[
                drift_pb2.DriftResult(
                    feature=c.feature,
                    source=c.source,
                    method=c.method,
                    statistic=c.statistic,
                    p_value=_opt(c.p_value),
                    status=c.status,
                    details={k: v for k, v in c.details.items() if math.isfinite(v)},
                    note=c.note,
                )
                for c in report.checks
            ],
            elapsed_ms=report.elapsed_ms,
            sampled_fraction=report.sampled_fraction,
        )

    async def CreateReferenceProfile(
        self, request: drift_pb2.CreateReferenceProfileRequest, context: grpc.aio.ServicerContext
    ) -> drift_pb2.CreateReferenceProfileResponse:
        which = request.WhichOneof("reference")
        if which == "rows":
            features = [(f.source, f.name, list(f.values), list(f.categories)) for f in request.rows.features]
            created = await asyncio.to_thread(
                self.service.create_profile_from_rows,
                request.model,
                request.model_version,
                features,
                description=request.description,
            )
            return _created(created)
        if which is None:
            raise errors.InvalidArgument("a reference is required: set window or rows")
        start, end = _window(request.window, required=True)
        selection = request.features
        if request.HasField("features"):
            inputs, outputs = selection.inputs, selection.outputs
        else:
            inputs, outputs = True, False
        created = await asyncio.to_thread(
            self.service.create_profile_from_window,
            request.model,
            request.model_version,
            start,
            end,
            inputs=inputs,
            outputs=outputs,
            columns=list(selection.columns),
            names=list(selection.names),
            description=request.description,
        )
        return _created(created)

    async def AnalyzeExperiment(
        self, request: drift_pb2.AnalyzeExperimentRequest, context: grpc.aio.ServicerContext
    ) -> drift_pb2.AnalyzeExperimentResponse:
        start, end = _window(request.window, required=False)
        specs = [MetricSpec(m.kind, m.name, m.column, m.quantile, m.value, m.mde) for m in request.metrics]
        report = await asyncio.to_thread(
            self.service.analyze_experiment,
            request.model,
            request.experiment,
            start,
            end,
            control=request.control_variant,
            expected_weights=dict(request.expected_weights),
            metrics=specs,
            alpha=request.alpha or 0.05,
            sequential=request.sequential,
            correction=request.correction,
            srm_threshold=request.srm_threshold or 0.001,
            analysis_unit=request.analysis_unit,
            bandit_floor=request.bandit_floor,
        )
        return drift_pb2.AnalyzeExperimentResponse(
            model=report.model,
            experiment=report.experiment,
            analysis_unit=report.analysis_unit,
            srm=drift_pb2.SrmCheck(
                statistic=report.srm.statistic if math.isfinite(report.srm.statistic) else 0.0,
                p_value=report.srm.p_value,
                mismatch=report.srm.mismatch,
                threshold=report.srm.threshold,
            ),
            variants=[
                drift_pb2.VariantSummary(
                    variant=v.variant,
                    units=v.units,
                    predictions=v.predictions,
                    expected_fraction=v.expected_fraction,
                    observed_fraction=v.observed_fraction,
                )
                for v in report.variants
            ],
            results=[
                drift_pb2.MetricResult(
                    metric=m.result.metric,
                    kind=m.kind,
                    control_variant=m.control,
                    treatment_variant=m.treatment,
                    method=m.result.method,
                    control_value=m.result.control_value,
                    treatment_value=m.result.treatment_value,
                    estimate=m.result.estimate,
                    ci_low=m.result.ci_low,
                    ci_high=m.result.ci_high,
                    p_value=_opt(m.result.p_value),
                    always_valid_p_value=_opt(m.result.always_valid_p_value),
                    relative_lift=_opt(m.result.relative_lift),
                    decision=m.result.decision,
                    n_control=m.result.n_control,
                    n_treatment=m.result.n_treatment,
                    srm_mismatch=m.srm_mismatch,
                    alpha=m.result.alpha,
                    note=m.note,
                    prob_treatment_better=_opt(m.bayes.prob_treatment_better if m.bayes else None),
                    expected_loss_treatment=_opt(m.bayes.expected_loss_treatment if m.bayes else None),
                )
                for m in report.results
            ],
            elapsed_ms=report.elapsed_ms,
            bandit=[
                drift_pb2.BanditAllocation(
                    metric=b.metric, weights=b.weights, prob_best=b.prob_best, successes=b.successes, trials=b.trials
                )
                for b in report.bandit
            ],
        )

    async def SampleSize(
        self, request: drift_pb2.SampleSizeRequest, context: grpc.aio.ServicerContext
    ) -> drift_pb2.SampleSizeResponse:
        result = self.service.sample_size(
            baseline_rate=request.baseline_rate,
            relative_mde=request.relative_mde,
            absolute_mde=request.absolute_mde,
            std=request.std,
            alpha=request.alpha or 0.05,
            power=request.power or 0.8,
            ratio=request.ratio or 1.0,
            one_sided=request.one_sided,
        )
        return drift_pb2.SampleSizeResponse(
            n_per_variant=result.n_control,
            n_treatment=result.n_treatment,
            total=result.total,
            effect_size=result.effect_size,
            method=result.method,
        )


def registration(service: DriftService, scheduler: DriftScheduler | None = None) -> ServiceRegistration:
    servicer = DriftServicer(service, scheduler)
    return ServiceRegistration(
        "mlmesh.v1.Drift", lambda server: drift_pb2_grpc.add_DriftServicer_to_server(servicer, server)
    )
