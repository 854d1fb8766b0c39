"""Canary rollouts: ramp a candidate through traffic steps, judge each step, promote or roll back.

Each step gives the candidate a share of units (sticky: the canary takes the first buckets, so
growing the share only adds units). A step is judged on the traffic since it began, from the
routers' own counters; `StepJudge`s are pluggable so analysis verdicts from ClickHouse can join.
A rollback restores routing first and tidies up after, so the time a bad version serves is short.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import grpc
from statsmodels.stats.proportion import proportion_confint

from services.common import errors
from services.common.routing import Experiment, RouteTarget, Shadow, Variant
from services.registry import stages
from services.registry.core import Registry, TableOverlay
from services.registry.deployer import DeploymentError, triton_name
from services.registry.fleet import Traffic
from services.registry.settings import RolloutDefaults
from services.registry.store import VersionRecord, utc_now

log = logging.getLogger(__name__)

RUNNING, PAUSED, PROMOTED, ROLLED_BACK, ABORTED, FAILED = (
    "running", "paused", "promoted", "rolled_back", "aborted", "failed"
)
FINAL_STATES = {PROMOTED, ROLLED_BACK, ABORTED, FAILED}
CANARY_VARIANT = "canary"
RAMP, BANDIT = "ramp", "bandit"
BANDIT_PROPORTIONS = ("label_rate", "outcome_rate")
MIN_REQUESTS_FOR_EARLY_ROLLBACK = 10


@dataclass(slots=True)
class Triggers:
    max_error_rate: float
    max_latency_p95_ms: float
    max_latency_ratio: float


@dataclass(slots=True)
class StepWindow:
    """What a judge sees: the traffic of both arms since the step began."""

    canary: Traffic
    stable: Traffic
    elapsed_s: float
    step_duration_s: float
    min_requests: int
    fraction: float = 0.0  # the canary's share during this step
    started_unix: float = 0.0
    rollout_started_unix: float = 0.0  # bandit: the posterior uses everything since the start

    @property
    def complete(self) -> bool:
        return self.elapsed_s >= self.step_duration_s and self.canary.requests >= self.min_requests


@dataclass(slots=True)
class Judgement:
    rollback: bool
    reasons: list[str] = field(default_factory=list)
    halt: bool = False  # pause for a human: the evidence itself is suspect (e.g. sample ratio mismatch)
    wait: bool = False  # no verdict yet: judge the step again later
    promote: bool = False  # the candidate won on the primary metric: promote now, skipping later steps
    canary_weight: float | None = None  # bandit: the canary's share for the next round
    prob_canary_best: float | None = None  # bandit: posterior probability the canary is better


class StepJudge(Protocol):
    """Judges a step's window; may be async (an analysis service answering from ClickHouse)."""

    def judge(self, window: StepWindow) -> Judgement | Awaitable[Judgement]: ...


class TriggerJudge:
    """The pre-agreed rollback triggers on error rate and latency."""

    def __init__(self, triggers: Triggers) -> None:
        self.triggers = triggers

    def judge(self, window: StepWindow) -> Judgement:
        canary, stable, t = window.canary, window.stable, self.triggers
        reasons: list[str] = []
        n = canary.requests
        if n >= MIN_REQUESTS_FOR_EARLY_ROLLBACK and canary.failed:
            low, high = proportion_confint(canary.failed, n, alpha=0.05, method="wilson")
            # Early: the whole 95% interval is above the limit. At the end of a step: the estimate.
            if low > t.max_error_rate or (window.complete and canary.error_rate > t.max_error_rate):
                reasons.append(
                    f"error rate {canary.error_rate:.3f} (95% CI {low:.3f}-{high:.3f}, {canary.failed}/{n}) "
                    f"above {t.max_error_rate:.3f}"
                )
        # Latency is judged on a whole step only: a few slow first requests of a fresh instance
        # dominate the p95 of a small early sample.
        if window.complete:
            p95 = canary.latency_quantile_ms(0.95)
            if t.max_latency_p95_ms > 0 and p95 > t.max_latency_p95_ms:
                reasons.append(f"latency p95 {p95:.1f} ms above {t.max_latency_p95_ms:.1f} ms")
            if t.max_latency_ratio > 0 and stable.requests >= window.min_requests:
                stable_p95 = stable.latency_quantile_ms(0.95)
                if stable_p95 > 0 and p95 > t.max_latency_ratio * stable_p95:
                    reasons.append(
                        f"latency p95 {p95:.1f} ms is {p95 / stable_p95:.1f}x stable's {stable_p95:.1f} ms "
                        f"(limit {t.max_latency_ratio:.1f}x)"
                    )
        return Judgement(bool(reasons), reasons)


def metric_label(spec: dict[str, Any]) -> str:
    """The name results carry: given, or kind[value] / kind(column)."""
    if spec.get("name"):
        return str(spec["name"])
    kind = str(spec.get("kind", ""))
    if spec.get("value"):
        return f"{kind}[{spec['value']}]"
    return f"{kind}({spec['column']})" if spec.get("column") else kind


def stats_of(traffic: Traffic) -> dict[str, Any]:
    return {
        "requests": traffic.requests,
        "errors": traffic.failed,
        "error_rate": round(traffic.error_rate, 6),
        "latency_p95_ms": round(traffic.latency_quantile_ms(0.95), 3),
        "fallbacks": traffic.fallbacks,
    }


@dataclass(slots=True)
class RolloutState:
    id: str
    model: str
    candidate_version: int
    stable_version: int
    steps: list[float]
    step_duration_s: float
    min_requests: int
    triggers: dict[str, float]
    policy_yaml: str = ""
    shadow_fraction: float = 0.0
    state: str = RUNNING
    step: int = 0
    fraction: float = 0.0
    analyses: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    started_at: str = field(default_factory=utc_now)
    ended_at: str = ""
    canary_requests: int = 0
    time_to_rollback_s: float = 0.0
    actor: str = ""
    primary_metric: dict[str, Any] | None = None  # MetricSpec fields (kind, name, value, column, quantile)
    lower_is_better: bool = False
    allocation: str = RAMP
    max_rounds: int = 20
    bandit_floor: float = 0.05
    decision_probability: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RolloutController:
    def __init__(
        self,
        registry: Registry,
        defaults: RolloutDefaults,
        extra_judges: list[StepJudge] | None = None,
        analysis_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.registry = registry
        # With an analysis service (ClickHouse), its verdicts join the router-counter judges.
        self.analysis_channel = analysis_channel
        self.defaults = defaults
        self.extra_judges = extra_judges or []
        self._states: dict[str, RolloutState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._judge_cache: dict[tuple[str, str], list[StepJudge]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        registry.rollout_active = self.active_for  # the registry refuses swaps during a rollout

    async def load(self) -> None:
        """Rollouts interrupted by a registry restart come back paused, at the step they were on."""
        for data in await self.registry.db(self.registry.store.rollouts, None):
            state = RolloutState(**data)
            if state.state == RUNNING:
                state.state, state.reason = PAUSED, "registry restarted; resume to continue"
            self._states[state.id] = state
            if state.state == PAUSED:
                self._apply_overlay(state)
                self._wake[state.id] = asyncio.Event()
                self._tasks[state.id] = asyncio.create_task(self._run(state))
        await self.registry.publish_table()

    async def close(self) -> None:
        if self.analysis_channel is not None:
            await self.analysis_channel.close()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def active_for(self, model: str) -> RolloutState | None:
        for state in self._states.values():
            if state.model == model and state.state not in FINAL_STATES:
                return state
        return None

    def get(self, rollout_id: str = "", model: str = "") -> RolloutState:
        if rollout_id:
            state = self._states.get(rollout_id)
            if state is None:
                raise errors.NotFound(f"id: no rollout '{rollout_id}'")
            return state
        matches = [s for s in self._states.values() if s.model == model]
        if not matches:
            raise errors.NotFound(f"model: no rollout for '{model}'")
        return max(matches, key=lambda s: s.started_at)

    def list(self, model: str = "") -> list[RolloutState]:
        return sorted((s for s in self._states.values() if not model or s.model == model), key=lambda s: s.started_at)

    async def _save(self, state: RolloutState) -> None:
        await self.registry.db(
            self.registry.store.save_rollout, state.id, state.model, state.state, state.started_at, state.to_dict()
        )

    # -- commands ------------------------------------------------------------------------------

    async def start(
        self,
        actor: str,
        model: str,
        version: str,
        *,
        steps: list[float] | None = None,
        step_duration_s: float = 0.0,
        min_requests: int = 0,
        triggers: dict[str, float] | None = None,
        policy_yaml: str = "",
        shadow_fraction: float = 0.0,
        reason: str = "",
        primary_metric: dict[str, Any] | None = None,
        lower_is_better: bool = False,
        allocation: str = "",
        max_rounds: int = 0,
        bandit_floor: float = 0.0,
        decision_probability: float = 0.0,
    ) -> RolloutState:
        allocation = allocation or RAMP
        self._check_primary(primary_metric, allocation, max_rounds, bandit_floor, decision_probability)
        steps = list(steps or self.defaults.steps)
        if any(not 0 < s <= 1 for s in steps) or steps != sorted(steps):
            raise errors.InvalidArgument("steps: canary fractions must be increasing and within (0, 1]")
        if steps[-1] != 1.0:
            steps.append(1.0)
        if not 0 <= shadow_fraction <= 1:
            raise errors.InvalidArgument("shadow_fraction: must be within [0, 1]")
        if policy_yaml:
            self._policy_judge(policy_yaml)  # a malformed policy is refused now, not mid-rollout
        async with self.registry.model_lock(model):
            if self.active_for(model) is not None:
                raise errors.FailedPrecondition(f"model '{model}' already has a rollout in progress")
            candidate = await self.registry.resolve(model, version)
            stable = await self.registry.production(model)
            if stable is None:
                raise errors.FailedPrecondition(
                    f"model '{model}' has no production version to compare with; promote one first"
                )
            if candidate.version == stable.version:
                raise errors.FailedPrecondition(f"version {candidate.version} is already in production")
            stages.check_transition(candidate.stage, stages.CANARY)
            t = triggers or {}
            state = RolloutState(
                id=uuid.uuid4().hex[:12],
                model=model,
                candidate_version=candidate.version,
                stable_version=stable.version,
                steps=steps,
                step_duration_s=step_duration_s or self.defaults.step_duration_s,
                min_requests=min_requests or self.defaults.min_requests_per_step,
                triggers={
                    "max_error_rate": t.get("max_error_rate") or self.defaults.max_error_rate,
                    "max_latency_p95_ms": t.get("max_latency_p95_ms") or self.defaults.max_latency_p95_ms,
                    "max_latency_ratio": t.get("max_latency_ratio") or self.defaults.max_latency_ratio,
                },
                policy_yaml=policy_yaml,
                shadow_fraction=shadow_fraction,
                actor=actor,
                reason=reason,
                primary_metric=primary_metric or None,
                lower_is_better=lower_is_better,
                allocation=allocation,
                max_rounds=max_rounds or 20,
                bandit_floor=bandit_floor or 0.05,
                decision_probability=decision_probability or 0.95,
            )
            try:
                await self.registry.ensure_loaded(candidate, lambda _p, _m: None)
            except DeploymentError as exc:
                await self.registry.audit(actor, "rollout_failed", model, exc.message, version=candidate.version)
                raise
            await self.registry.set_stage(actor, candidate, stages.CANARY, reason or "rollout start", rollout=state.id)
            await self.registry.audit(actor, "rollout_start", model, reason, rollout=state.id,
                                      candidate=candidate.version, stable=stable.version, steps=steps)
            self._states[state.id] = state
            await self._save(state)
            self._wake[state.id] = asyncio.Event()
            self._tasks[state.id] = asyncio.create_task(self._run(state))
            return state

    def _check_primary(
        self, primary: dict[str, Any] | None, allocation: str, max_rounds: int, floor: float, decision: float
    ) -> None:
        if allocation not in (RAMP, BANDIT):
            raise errors.InvalidArgument(f"allocation: '{allocation}' is not one of ramp, bandit")
        if primary and self.analysis_channel is None:
            raise errors.FailedPrecondition(
                "primary_metric: judged on logged events, which needs the analysis service (analysis_address)"
            )
        if allocation != BANDIT:
            return
        if not primary or primary.get("kind") not in BANDIT_PROPORTIONS:
            raise errors.InvalidArgument(
                f"primary_metric: a bandit needs a proportion metric ({', '.join(BANDIT_PROPORTIONS)}) to reward"
            )
        if max_rounds < 0 or not 0 <= floor < 0.5 or not (decision == 0 or 0.5 < decision < 1):
            raise errors.InvalidArgument(
                "bandit: max_rounds >= 0, bandit_floor in [0, 0.5) and decision_probability in (0.5, 1)"
            )

    async def control(self, actor: str, rollout_id: str, action: str, reason: str) -> RolloutState:
        state = self.get(rollout_id)
        if state.state in FINAL_STATES:
            raise errors.FailedPrecondition(f"rollout {rollout_id} has already ended ({state.state})")
        if action == "pause":
            if state.state == PAUSED:
                raise errors.FailedPrecondition(f"rollout {rollout_id} is already paused")
            state.state, state.reason = PAUSED, reason or "paused"
        elif action == "resume":
            if state.state != PAUSED:
                raise errors.FailedPrecondition(f"rollout {rollout_id} is not paused")
            state.state, state.reason = RUNNING, ""
        elif action == "abort":
            state.state, state.reason = ABORTED, reason or "aborted"
        else:
            raise errors.InvalidArgument(f"action: '{action}' is not one of pause, resume, abort")
        await self.registry.audit(actor, f"rollout_{action}", state.model, reason, rollout=rollout_id, step=state.step)
        await self._save(state)
        self._wake[rollout_id].set()
        if action == "abort":
            await asyncio.shield(self._tasks[rollout_id])
        return state

    # -- the loop --------------------------------------------------------------------------------

    def _targets(self, state: RolloutState) -> tuple[RouteTarget, RouteTarget]:
        model = state.model
        return (
            RouteTarget(triton_name(model, state.candidate_version), "", str(state.candidate_version)),
            RouteTarget(triton_name(model, state.stable_version), "", str(state.stable_version)),
        )

    def _apply_overlay(self, state: RolloutState, shadow_phase: bool = False) -> None:
        candidate, stable = self._targets(state)
        if shadow_phase:
            self.registry.overlays[state.model] = TableOverlay(
                shadows=(Shadow("shadow", candidate, state.shadow_fraction),)
            )
            return
        experiment = Experiment(
            name=f"rollout-{state.id}",
            salt=state.id,
            variants=(
                Variant(CANARY_VARIANT, candidate, state.fraction),
                Variant("stable", stable, 1.0 - state.fraction),
            ),
        )
        self.registry.overlays[state.model] = TableOverlay(experiment=experiment)

    def _judges(self, state: RolloutState, phase: str) -> list[StepJudge]:
        """Built once per rollout and phase (the policy is parsed once, not at every analysis)."""
        key = (state.id, phase)
        if key not in self._judge_cache:
            self._judge_cache[key] = self._build_judges(state, phase)
        return self._judge_cache[key]

    def _build_judges(self, state: RolloutState, phase: str) -> list[StepJudge]:
        t = state.triggers
        judges: list[StepJudge] = [TriggerJudge(Triggers(t["max_error_rate"], t["max_latency_p95_ms"],
                                                         t["max_latency_ratio"]))]
        if state.policy_yaml:
            judges.append(self._policy_judge(state.policy_yaml))
        if self.analysis_channel is not None and phase == "canary":
            from services.registry.analysis_gate import AnalysisGate, GateSettings

            judges.append(AnalysisGate(
                self.analysis_channel, state.model, f"rollout-{state.id}",
                GateSettings(
                    primary_metric=state.primary_metric, lower_is_better=state.lower_is_better,
                    bandit=state.allocation == BANDIT, bandit_floor=state.bandit_floor,
                    decision_probability=state.decision_probability, min_trials=state.min_requests,
                ),
            ))
        return judges + self.extra_judges

    def _policy_judge(self, policy_yaml: str) -> StepJudge:
        from services.registry.live_policy import LivePolicyJudge

        return LivePolicyJudge(policy_yaml)

    async def _sleep_or_wake(self, state: RolloutState, seconds: float) -> None:
        wake = self._wake[state.id]
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except TimeoutError:
            pass
        wake.clear()

    async def _run(self, state: RolloutState) -> None:
        try:
            await self._run_steps(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the rollout ends safely: routing back to stable
            log.exception("rollout %s failed", state.id)
            await self._end_with_stable(state, FAILED, f"controller error: {exc}")

    async def _run_steps(self, state: RolloutState) -> None:
        fleet = self.registry.fleet
        interval = self.defaults.analysis_interval_s
        keys = [(CANARY_VARIANT, str(state.candidate_version)), ("stable", str(state.stable_version)),
                ("shadow", str(state.candidate_version))]
        first_exposure = time.monotonic()
        rollout_started_unix = datetime.fromisoformat(state.started_at.replace("Z", "+00:00")).timestamp()
        for phase, fraction in self._phases(state):
            while state.state == PAUSED:
                await self._sleep_or_wake(state, 3600)
            if state.state == ABORTED:
                await self._end_with_stable(state, ABORTED, state.reason)
                return
            if phase == "canary":
                state.fraction = fraction
            self._apply_overlay(state, shadow_phase=phase == "shadow")
            table_version = await self.registry.publish_table()
            await fleet.wait_applied(table_version, self.registry.settings.route_apply_timeout_s)
            await self._save(state)
            baseline = fleet.snapshot(state.model, keys)
            step_started, started_at, step_started_unix = time.monotonic(), utc_now(), time.time()
            canary_key = ("shadow" if phase == "shadow" else CANARY_VARIANT, str(state.candidate_version))
            while True:
                await self._sleep_or_wake(state, interval)
                if state.state == ABORTED:
                    await self._end_with_stable(state, ABORTED, state.reason)
                    return
                if state.state == PAUSED:
                    while state.state == PAUSED:
                        await self._sleep_or_wake(state, 3600)
                    baseline, step_started = fleet.snapshot(state.model, keys), time.monotonic()
                    step_started_unix = time.time()
                    continue
                window = StepWindow(
                    canary=fleet.since(state.model, canary_key, baseline),
                    stable=fleet.since(state.model, ("stable", str(state.stable_version)), baseline),
                    elapsed_s=time.monotonic() - step_started,
                    step_duration_s=state.step_duration_s,
                    min_requests=state.min_requests,
                    fraction=fraction if phase == "canary" else 0.0,
                    started_unix=step_started_unix,
                    rollout_started_unix=rollout_started_unix,
                )
                reasons: list[str] = []
                halts: list[str] = []
                wins: list[str] = []
                bandit: Judgement | None = None
                waiting = False
                for judge in self._judges(state, phase):
                    if isinstance(judge, TriggerJudge) or window.complete:
                        verdict = judge.judge(window)
                        if inspect.isawaitable(verdict):  # e.g. an analysis query in ClickHouse
                            verdict = await verdict
                        reasons += verdict.reasons if verdict.rollback else []
                        halts += verdict.reasons if verdict.halt else []
                        wins += verdict.reasons if verdict.promote else []
                        bandit = verdict if verdict.canary_weight is not None else bandit
                        waiting = waiting or verdict.wait
                if halts and not reasons:
                    state.state, state.reason = PAUSED, "halted: " + "; ".join(halts)
                    await self.registry.audit("rollout-controller", "rollout_halted", state.model, state.reason,
                                              rollout=state.id, step=state.step)
                    await self._save(state)
                    continue
                if waiting and not reasons:
                    continue
                if reasons or window.complete:
                    verdict = "rollback" if reasons else "promote" if wins else "continue"
                    analysis = {
                        "step": state.step, "phase": phase, "fraction": fraction, "started_at": started_at,
                        "ended_at": utc_now(), "verdict": verdict, "reasons": reasons or wins,
                        "canary": stats_of(window.canary), "stable": stats_of(window.stable),
                    }
                    if bandit is not None:
                        analysis["prob_canary_best"] = bandit.prob_canary_best
                        analysis["reasons"] = reasons or wins or bandit.reasons
                    state.analyses.append(analysis)
                    if phase == "canary":
                        state.canary_requests += window.canary.requests
                    if reasons:
                        await self._end_with_stable(state, ROLLED_BACK, "; ".join(reasons), first_exposure)
                        return
                    if wins:
                        await self._promote(state, "; ".join(wins))
                        return
                    if phase == "canary":
                        state.step += 1
                        if bandit is not None and bandit.canary_weight is not None:
                            state.fraction = bandit.canary_weight
                    await self._save(state)
                    break
        if state.allocation == BANDIT:
            await self._end_with_stable(
                state, ROLLED_BACK, f"bandit: no winner after {state.max_rounds} rounds; stable kept", first_exposure
            )
            return
        await self._promote(state)

    def _phases(self, state: RolloutState) -> Iterator[tuple[str, float]]:
        """Ramp: the steps left. Bandit: rounds, each at the share the last analysis gave the canary."""
        if state.shadow_fraction > 0 and state.step == 0 and not state.analyses:
            yield "shadow", state.shadow_fraction
        if state.allocation != BANDIT:
            yield from (("canary", f) for f in state.steps[state.step:])
            return
        while state.step < state.max_rounds:
            # A fresh bandit splits evenly: the uniform prior's Thompson weights.
            yield "canary", state.fraction or 0.5

    async def _end_with_stable(
        self, state: RolloutState, final_state: str, reason: str, exposed_since: float | None = None
    ) -> None:
        """Routing goes back to stable first; then the candidate is archived and unloaded."""
        self.registry.overlays.pop(state.model, None)
        table_version = await self.registry.publish_table()
        await self.registry.fleet.wait_applied(table_version, self.registry.settings.route_apply_timeout_s)
        if exposed_since is not None:
            state.time_to_rollback_s = round(time.monotonic() - exposed_since, 3)
        state.state, state.reason, state.ended_at = final_state, reason, utc_now()
        candidate = await self.registry.resolve(state.model, str(state.candidate_version))
        target_stage = stages.ARCHIVED if final_state in (ROLLED_BACK, FAILED) else stages.STAGING
        if candidate.stage == stages.CANARY:
            await self.registry.set_stage("rollout-controller", candidate, target_stage, reason, rollout=state.id)
        await self.registry.audit(
            "rollout-controller" if final_state != ABORTED else state.actor,
            f"rollout_{final_state}", state.model, reason, rollout=state.id, step=state.step,
            canary_requests=state.canary_requests, time_to_rollback_s=state.time_to_rollback_s,
        )
        await self._save(state)
        await self._unload_later(candidate, table_version)

    async def _unload_later(self, candidate: VersionRecord, table_version: int) -> None:
        if candidate.triton_model:
            await self.registry.drain_and_unload(candidate, table_version, lambda _p, _m: None)

    async def _promote(self, state: RolloutState, reason: str = "") -> None:
        """The rollout reads as promoted only once the candidate is production and routed to."""
        candidate = await self.registry.resolve(state.model, str(state.candidate_version))
        reason = reason or f"all {len(state.steps)} steps passed"
        async with self.registry.model_lock(state.model):
            await self.registry.swap_locked(
                "rollout-controller", candidate, reason, lambda _p, _m: None, action="promote"
            )
        state.state, state.reason, state.ended_at = PROMOTED, reason, utc_now()
        await self._save(state)
