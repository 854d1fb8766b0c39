"""gRPC transport for the registry: protobuf in, Registry / RolloutController calls, protobuf out."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from services.common import errors
from services.common.api import drift_pb2, registry_pb2, registry_pb2_grpc, routing_pb2
from services.common.routing import table_to_proto
from services.common.server import ServiceRegistration
from services.registry.artifacts import read_directory
from services.registry.core import Progress, Registry, run_with_progress
from services.registry.rollout import RolloutController, RolloutState, metric_label
from services.registry.store import VersionRecord

ACTOR_METADATA = "x-mlmesh-actor"
LINEAGE_FIELDS = ("dataset_version", "dataset_sha256", "code_commit", "training_config_json", "evaluation_json",
                  "parent_version")


def actor_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA and value:
            return str(value)[:200]
    return f"anonymous@{context.peer()}"


def version_to_pb(record: VersionRecord, card: str = "") -> registry_pb2.ModelVersion:
    lineage = record.lineage
    return registry_pb2.ModelVersion(
        model=record.model,
        version=str(record.version),
        kind=record.kind,
        stage=record.stage,
        aliases=record.aliases,
        artifact_sha256=record.artifact_sha256,
        artifact_bytes=record.artifact_bytes,
        artifact_files=record.artifact_files,
        created_at=record.created_at,
        created_by=record.created_by,
        description=record.description,
        lineage=registry_pb2.Lineage(
            **{k: str(lineage.get(k, "")) for k in LINEAGE_FIELDS},
            privacy_epsilon=float(lineage.get("privacy_epsilon", 0.0)),
            privacy_delta=float(lineage.get("privacy_delta", 0.0)),
        ),
        tags=record.tags,
        triton_model=record.triton_model,
        model_card=card,
    )


def lineage_from_pb(msg: registry_pb2.Lineage) -> dict[str, Any]:
    lineage: dict[str, Any] = {k: getattr(msg, k) for k in LINEAGE_FIELDS if getattr(msg, k)}
    for key in ("training_config_json", "evaluation_json"):
        if key in lineage:
            try:
                json.loads(lineage[key])
            except ValueError as exc:
                raise errors.InvalidArgument(f"lineage.{key}: not valid JSON ({exc})") from exc
    if msg.privacy_epsilon:
        lineage["privacy_epsilon"] = msg.privacy_epsilon
        lineage["privacy_delta"] = msg.privacy_delta
    return lineage


def rollout_to_pb(state: RolloutState) -> registry_pb2.Rollout:
    msg = registry_pb2.Rollout(
        id=state.id,
        model=state.model,
        candidate_version=str(state.candidate_version),
        stable_version=str(state.stable_version),
        state=state.state,
        step=state.step,
        steps=state.steps,
        fraction=state.fraction,
        reason=state.reason,
        started_at=state.started_at,
        ended_at=state.ended_at,
        canary_requests=state.canary_requests,
        time_to_rollback_s=state.time_to_rollback_s,
        allocation=state.allocation,
        primary_metric=metric_label(state.primary_metric) if state.primary_metric else "",
    )
    for a in state.analyses:
        msg.analyses.add(
            step=a["step"], fraction=a["fraction"], started_at=a["started_at"], ended_at=a["ended_at"],
            verdict=a["verdict"] if a["phase"] == "canary" else f"shadow:{a['verdict']}", reasons=a["reasons"],
            canary=registry_pb2.VariantStats(**a["canary"]), stable=registry_pb2.VariantStats(**a["stable"]),
            prob_canary_best=a.get("prob_canary_best"),
        )
    return msg


def metric_spec_fields(spec: drift_pb2.MetricSpec) -> dict[str, Any] | None:
    """The fields set on a MetricSpec (None when it is empty), as a rollout stores them."""
    fields = {f.name: value for f, value in spec.ListFields()}
    return fields or None


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, rollouts: RolloutController) -> None:
        self.registry = registry
        self.rollouts = rollouts

    async def RegisterVersion(self, request, context):
        files = dict(request.files)
        if request.source_path:
            if files:
                raise errors.InvalidArgument("source_path and files: give one, not both")
            files = read_directory(Path(request.source_path))
        record = await self.registry.register(
            actor_of(context), request.model, request.kind, files, request.description,
            lineage_from_pb(request.lineage), dict(request.tags),
        )
        return version_to_pb(record)

    async def ListModels(self, request, context):
        records = await self.registry.list_versions(request.model)
        return registry_pb2.ListRegisteredModelsResponse(versions=[version_to_pb(r) for r in records])

    async def GetVersion(self, request, context):
        record = await self.registry.resolve(request.model, request.version)
        return version_to_pb(record, await self.registry.card(record))

    async def _stream(
        self, operation: Callable[[Progress], Awaitable[VersionRecord]]
    ) -> AsyncIterator[registry_pb2.DeployProgress]:
        started = time.monotonic()
        async for phase, message, value in run_with_progress(operation):
            elapsed = time.monotonic() - started
            if phase == "result":
                yield registry_pb2.DeployProgress(phase="done", message="", elapsed_s=elapsed,
                                                  version=version_to_pb(value))
            else:
                yield registry_pb2.DeployProgress(phase=phase, message=message, elapsed_s=elapsed)

    async def TransitionStage(self, request, context):
        actor = actor_of(context)
        async for item in self._stream(
            lambda progress: self.registry.transition(
                actor, request.model, request.version, request.stage, request.reason, progress
            )
        ):
            yield item

    async def SetAlias(self, request, context):
        record = await self.registry.set_alias(
            actor_of(context), request.model, request.version, request.alias, request.reason
        )
        return version_to_pb(record)

    async def Rollback(self, request, context):
        actor = actor_of(context)
        async for item in self._stream(
            lambda progress: self.registry.rollback(actor, request.model, request.reason, progress)
        ):
            yield item

    async def StartRollout(self, request, context):
        t = request.triggers
        state = await self.rollouts.start(
            actor_of(context), request.model, request.version,
            steps=list(request.steps), step_duration_s=request.step_duration_s,
            min_requests=request.min_requests_per_step,
            triggers={"max_error_rate": t.max_error_rate, "max_latency_p95_ms": t.max_latency_p95_ms,
                      "max_latency_ratio": t.max_latency_ratio},
            policy_yaml=request.policy_yaml, shadow_fraction=request.shadow_fraction, reason=request.reason,
            primary_metric=metric_spec_fields(request.primary_metric), lower_is_better=request.lower_is_better,
            allocation=request.allocation, max_rounds=request.max_rounds, bandit_floor=request.bandit_floor,
            decision_probability=request.decision_probability,
        )
        return rollout_to_pb(state)

    async def GetRollout(self, request, context):
        if not request.id and not request.model:
            raise errors.InvalidArgument("id or model: one is required")
        return rollout_to_pb(self.rollouts.get(request.id, request.model))

    async def ListRollouts(self, request, context):
        return registry_pb2.ListRolloutsResponse(rollouts=[rollout_to_pb(s) for s in self.rollouts.list(request.model)])

    async def ControlRollout(self, request, context):
        state = await self.rollouts.control(actor_of(context), request.id, request.action, request.reason)
        return rollout_to_pb(state)

    async def EvaluatePolicy(self, request, context):
        from services.registry.live_policy import evaluate_report

        decision = evaluate_report(request.policy_yaml, request.report_yaml)
        report = registry_pb2.PolicyReport(go=decision.go, text=decision.to_text())
        for rule in decision.rules:
            report.rules.add(
                rule=rule.rule, value="" if rule.value is None else f"{rule.value:.6g}",
                threshold="" if rule.threshold is None else f"{rule.op} {rule.threshold:g}",
                verdict=rule.verdict, detail=rule.detail,
            )
        return report

    async def ListAudit(self, request, context):
        entries = await self.registry.audit_entries(request.subject, request.limit or 100)
        return registry_pb2.ListAuditResponse(entries=[registry_pb2.AuditEntry(**e.as_row()) for e in entries])

    async def VerifyAudit(self, request, context):
        verdict = await self.registry.verify_audit()
        return registry_pb2.VerifyAuditResponse(
            ok=verdict.ok, entries=verdict.entries, first_bad_seq=verdict.first_bad_seq, problem=verdict.problem
        )

    async def WatchRoutes(self, request, context):
        async for table in self.registry.watch(request.known_version):
            yield table_to_proto(table)

    async def ReportRouterMetrics(self, request: routing_pb2.RouterMetricsReport, context):
        if not request.router_id:
            raise errors.InvalidArgument("router_id: required")
        await self.registry.fleet.report(request)
        return registry_pb2.ReportRouterMetricsResponse()


def registration(registry: Registry, rollouts: RolloutController) -> ServiceRegistration:
    servicer = RegistryServicer(registry, rollouts)
    return ServiceRegistration(
        "mlmesh.v1.Registry", lambda server: registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    )

