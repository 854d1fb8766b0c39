"""Routing logic, free of transport: resolve a public model name in the routing table, pick the
experiment variant, call Triton, fall back to the stable target, mirror shadow traffic, count.

The routing table (services.common.routing.RouteTable) is compiled once per table into plain
objects: per route, one Arm per way a request can be served, each holding its prebuilt ServedBy,
its counters and its breaker. A request therefore costs a dict lookup, (with an experiment) a
hash and a bisect, and a few int increments; a table swap is one attribute assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.common import errors
from services.common.domain import (
    MODEL_KIND_LLM,
    MODEL_KIND_TABULAR,
    GenerateChunk,
    GenerateInput,
    ModelInfo,
    PredictInput,
    PredictResult,
    RequestContext,
    ServedBy,
    TensorData,
)
from services.common.routing import (
    HOLDOUT_VARIANT,
    STABLE_VARIANT,
    ModelRoute,
    RouteTable,
    RouteTarget,
)
from services.router.assignment import BUCKETS, Bucketer, CompiledExperiment, shadow_threshold
from services.router.batching import PredictBatcher
from services.router.breaker import BreakerConfig, CircuitBreaker
from services.router.metrics import RouterMetrics, Series
from services.router.shadow import ShadowObserver, ShadowResult
from services.router.triton import TritonBackend, TritonModelInfo, model_deadline_exceeded

log = logging.getLogger(__name__)

# Failures of a variant's target that the stable target may well not have: retried there once.
# Not the caller's fault (INVALID_ARGUMENT), not out of time (DEADLINE_EXCEEDED, CANCELLED).
FALLBACK_ERRORS = (errors.Unavailable, errors.Internal, errors.NotFound, errors.ResourceExhausted)

_perf_counter = time.perf_counter
TargetKey = tuple[str, str]  # (triton_model, triton_version)


def _key(target: RouteTarget) -> TargetKey:
    return (target.triton_model, target.triton_version)


@dataclass(slots=True, eq=False)
class Arm:
    """One way a route's requests are served: a target under an (experiment, variant) label."""

    variant: str  # the counters' label ("stable" when no experiment applies)
    target: RouteTarget
    served_by: ServedBy
    series: Series
    info: TritonModelInfo | None
    breaker: CircuitBreaker | None = None  # set when there is a stable target to fall back to
    fallback: Arm | None = None


@dataclass(slots=True, eq=False)
class ShadowArm:
    name: str
    arm: Arm
    threshold: int  # buckets (of BUCKETS) of prediction ids that are copied
    bucket: Bucketer  # of prediction ids, salted with the shadow's name


@dataclass(slots=True, eq=False)
class CompiledRoute:
    route: ModelRoute
    model: str
    kind: str
    stable: Arm  # serves everything when there is no experiment
    experiment: CompiledExperiment | None = None
    arms: tuple[Arm, ...] = ()  # the experiment's variants, in listed order
    holdout: Arm | None = None
    unassigned: Arm | None = None  # the stable target under the experiment's label (also the fallback)
    shadows: tuple[ShadowArm, ...] = ()

    def pick(self, unit_id: str) -> Arm:
        index = self.experiment.index(unit_id)  # type: ignore[union-attr]
        if index >= 0:
            return self.arms[index]
        return self.holdout if index == -1 else self.unassigned  # type: ignore[return-value]


class RouterCore:
    def __init__(
        self,
        backend: TritonBackend,
        table: RouteTable,
        default_timeout_s: float = 30.0,
        batch_max_in_flight: int = 1,
        *,
        breaker: BreakerConfig | None = None,
        shadow_max_in_flight: int = 64,
        batch_gather_max_s: float = 0.0,
        observer: ShadowObserver | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.table = table
        self.default_timeout_s = default_timeout_s
        self.breaker_config = breaker or BreakerConfig()
        self.shadow_max_in_flight = shadow_max_in_flight
        self.observer = observer
        self.metrics = metrics or RouterMetrics()
        self.started_at = time.monotonic()
        self.tables_applied = 0
        self._model_info: dict[TargetKey, TritonModelInfo] = {}
        self._breakers: dict[RouteTarget, CircuitBreaker] = {}
        self._routes: dict[str, CompiledRoute] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._apply_lock = asyncio.Lock()
        self._closed = False
        # 0 disables coalescing: every Predict is its own Triton call.
        self._batcher = (
            PredictBatcher(backend, batch_max_in_flight, batch_gather_max_s) if batch_max_in_flight > 0 else None
        )
        self._compile()

    # -- routing table --

    @property
    def table_version(self) -> int:
        return self.table.version

    async def apply_table(self, table: RouteTable) -> bool:
        """Serve from `table` from now on. Learns the tensor contracts of its new targets first,
        then swaps in one assignment (requests in flight finish on the table they started with).
        A table older than the current one is ignored (False)."""
        async with self._apply_lock:
            if table.version < self.table.version:
                log.info("ignoring routing table v%d: v%d is already applied", table.version, self.table.version)
                return False
            missing = [key for key in _target_keys(table) if key not in self._model_info]
            if missing:
                await asyncio.gather(*(self._learn(key) for key in missing))
            for route in table.routes:
                if route.kind not in (MODEL_KIND_TABULAR, MODEL_KIND_LLM):
                    log.warning("table v%d: model %r has unknown kind %r", table.version, route.model, route.kind)
            previous = self.table.version
            self.table = table
            self._compile()
            self.tables_applied += 1
            log.info("routing table v%d applied (was v%d): %s", table.version, previous, _describe(table))
            return True

    async def _learn(self, key: TargetKey) -> None:
        try:
            self._model_info[key] = await self.backend.model_info(*key)
        except errors.MeshError as exc:
            log.warning("routing table target %s (version %r) has no model info yet: %s", key[0], key[1], exc.message)

    def _compile(self) -> None:
        """Turns self.table into the hot path's lookup dict; keeps counters and open breakers."""
        table = self.table
        breakers: dict[RouteTarget, CircuitBreaker] = {}
        compiled: dict[str, CompiledRoute] = {}
        for route in table.routes:
            compiled[route.model] = self._compile_route(route, breakers)
        self._breakers = breakers
        self._routes = compiled

    def _compile_route(self, route: ModelRoute, breakers: dict[RouteTarget, CircuitBreaker]) -> CompiledRoute:
        model = route.model

        def arm(experiment: str, variant: str, target: RouteTarget, shadow: bool = False) -> Arm:
            info = self._model_info.get(_key(target))
            version = target.model_version or (info.version if info else target.triton_version)
            series = self.metrics.series(model, experiment, variant, version, shadow)
            # Callers see no variant when no experiment applies (the counters say "stable").
            label = variant if experiment or shadow else ""
            return Arm(variant, target, ServedBy(model, version, experiment, label), series, info)

        result = CompiledRoute(route, model, route.kind, arm("", STABLE_VARIANT, route.stable))
        experiment = route.experiment
        experiment_name = ""
        if experiment is not None and experiment.variants:
            experiment_name = experiment.name
            unassigned = arm(experiment_name, STABLE_VARIANT, route.stable)
            arms = []
            for variant in experiment.variants:
                variant_arm = arm(experiment_name, variant.name, variant.target)
                if variant.target != route.stable:
                    # Breakers outlive table swaps: an open one stays open while its target is routed.
                    breaker = breakers.get(variant.target) or self._breakers.get(variant.target)
                    if breaker is None:
                        breaker = CircuitBreaker(self.breaker_config)
                    breakers[variant.target] = variant_arm.breaker = breaker
                    variant_arm.fallback = unassigned
                arms.append(variant_arm)
            result.experiment = CompiledExperiment.of(experiment)
            result.arms = tuple(arms)
            result.holdout = arm(experiment_name, HOLDOUT_VARIANT, route.stable)
            result.unassigned = unassigned
        result.shadows = tuple(
            ShadowArm(
                s.name,
                arm(experiment_name, s.name, s.target, shadow=True),
                shadow_threshold(s.fraction),
                Bucketer(s.name),
            )
            for s in route.shadows
            if shadow_threshold(s.fraction) > 0
        )
        return result

    def target_info(self, target: RouteTarget) -> TritonModelInfo | None:
        """What the router knows of a target's tensor contract and batching (None: not learnt yet)."""
        return self._model_info.get(_key(target))

    def breaker(self, target: RouteTarget) -> CircuitBreaker | None:
        """The breaker guarding a variant target of the current table (None for stable targets)."""
        return self._breakers.get(target)

    # -- Predict --

    async def predict(self, ctx: RequestContext, request: PredictInput) -> PredictResult:
        route = self._routes.get(request.model)
        if route is None or route.kind != MODEL_KIND_TABULAR:
            route = self._resolve(request.model, MODEL_KIND_TABULAR)
        if route.experiment is None:
            arm = route.stable
        else:
            arm = route.pick(request.unit_id or request.request_id or ctx.prediction_id)
        timeout = ctx.timeout_s or self.default_timeout_s
        if route.shadows:
            self._shadow_predict(route, ctx, request, timeout)
        breaker = arm.breaker
        series = arm.series
        if breaker is not None and not breaker.allow():
            series.requests += 1
            series.fallbacks += 1
            return await self._predict_on(arm.fallback, ctx, request, timeout)  # type: ignore[arg-type]
        series.requests += 1
        series.in_flight += 1
        target = arm.target
        info = arm.info
        started = _perf_counter()
        try:
            if self._batcher is not None and info is not None and info.batchable:
                outputs = await self._batcher.infer(
                    target.triton_model,
                    target.triton_version,
                    info.max_batch_size,
                    request.inputs,
                    request.outputs,
                    ctx.prediction_id,
                    timeout,
                )
            else:
                outputs = await self.backend.infer(
                    target.triton_model,
                    target.triton_version,
                    request.inputs,
                    request.outputs,
                    ctx.prediction_id,
                    timeout,
                )
        except errors.MeshError as exc:
            elapsed = _perf_counter() - started
            if not _count_failure(series, breaker, exc, elapsed * 1000.0) or timeout - elapsed <= 0.001:
                raise
            log.debug("%s: variant %s failed (%s); falling back to stable", request.model, arm.variant, exc.message)
            series.fallbacks += 1
        except BaseException:
            series.in_flight -= 1
            if breaker is not None:
                breaker.release()
            raise
        else:
            series.in_flight -= 1
            series.observe((_perf_counter() - started) * 1000.0)
            if breaker is not None:
                breaker.record_success()
            return PredictResult(ctx.prediction_id, arm.served_by, outputs)
        # The variant failed on the server side: once more on stable, within the same deadline.
        return await self._predict_on(arm.fallback, ctx, request, timeout - elapsed)  # type: ignore[arg-type]

    async def _predict_on(
        self, arm: Arm, ctx: RequestContext, request: PredictInput, timeout_s: float
    ) -> PredictResult:
        """One call to an arm with no fallback of its own (stable), counted on its series."""
        series = arm.series
        series.requests += 1
        series.in_flight += 1
        started = _perf_counter()
        try:
            outputs = await self._infer(arm, request.inputs, request.outputs, ctx.prediction_id, timeout_s)
        except errors.MeshError as exc:
            if not isinstance(exc, errors.Cancelled):
                series.errors += 1
            raise
        finally:
            series.in_flight -= 1
            series.observe((_perf_counter() - started) * 1000.0)
        return PredictResult(ctx.prediction_id, arm.served_by, outputs)

    async def _infer(
        self, arm: Arm, inputs: list[TensorData], outputs: list[str], request_id: str, timeout_s: float | None
    ) -> list[TensorData]:
        target, info = arm.target, arm.info
        if self._batcher is not None and info is not None and info.batchable:
            return await self._batcher.infer(
                target.triton_model, target.triton_version, info.max_batch_size, inputs, outputs, request_id, timeout_s
            )
        return await self.backend.infer(
            target.triton_model, target.triton_version, inputs, outputs, request_id, timeout_s
        )

    # -- Generate --

    async def generate(self, ctx: RequestContext, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        route = self._routes.get(request.model)
        if route is None or route.kind != MODEL_KIND_LLM:
            route = self._resolve(request.model, MODEL_KIND_LLM)
        if route.experiment is None:
            arm = route.stable
        else:
            arm = route.pick(request.unit_id or request.request_id or ctx.prediction_id)
        if route.shadows:
            self._shadow_generate(route, ctx, request)
        breaker = arm.breaker
        series = arm.series
        if breaker is not None and not breaker.allow():
            series.requests += 1
            series.fallbacks += 1
            stream = self._generate_on(arm.fallback, ctx, request, ctx.timeout_s)  # type: ignore[arg-type]
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
            return
        series.requests += 1
        series.in_flight += 1
        target = arm.target
        served_by = arm.served_by
        index = 0
        started = _perf_counter()
        try:
            async for token in self.backend.generate(
                target.triton_model, target.triton_version, request, ctx.prediction_id, ctx.timeout_s
            ):
                yield GenerateChunk(
                    prediction_id=ctx.prediction_id,
                    text=token.text,
                    index=index,
                    served_by=served_by,
                    finish_reason=token.finish_reason if token.final else "",
                    input_tokens=token.input_tokens,
                    output_tokens=token.output_tokens,
                )
                index += 1
        except errors.MeshError as exc:
            # Only before the first token: the caller has seen nothing yet, so stable can answer.
            if not _count_failure(series, breaker, exc, (_perf_counter() - started) * 1000.0) or index > 0:
                raise
            log.debug("%s: variant %s failed (%s); falling back to stable", request.model, arm.variant, exc.message)
            series.fallbacks += 1
        except BaseException:  # the caller left (GeneratorExit) or was cancelled
            series.in_flight -= 1
            series.observe((_perf_counter() - started) * 1000.0)
            if breaker is not None:
                breaker.release()
            raise
        else:
            series.in_flight -= 1
            series.observe((_perf_counter() - started) * 1000.0)
            if breaker is not None:
                breaker.record_success()
            return
        remaining = None if ctx.timeout_s is None else ctx.timeout_s - (_perf_counter() - started)
        if remaining is not None and remaining <= 0.001:
            raise model_deadline_exceeded(request.model)
        stream = self._generate_on(arm.fallback, ctx, request, remaining)  # type: ignore[arg-type]
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk

    async def _generate_on(
        self, arm: Arm, ctx: RequestContext, request: GenerateInput, timeout_s: float | None
    ) -> AsyncIterator[GenerateChunk]:
        series = arm.series
        series.requests += 1
        series.in_flight += 1
        target = arm.target
        index = 0
        started = _perf_counter()
        try:
            async for token in self.backend.generate(
                target.triton_model, target.triton_version, request, ctx.prediction_id, timeout_s
            ):
                yield GenerateChunk(
                    prediction_id=ctx.prediction_id,
                    text=token.text,
                    index=index,
                    served_by=arm.served_by,
                    finish_reason=token.finish_reason if token.final else "",
                    input_tokens=token.input_tokens,
                    output_tokens=token.output_tokens,
                )
                index += 1
        except errors.MeshError as exc:
            if not isinstance(exc, errors.Cancelled):
                series.errors += 1
            raise
        finally:
            series.in_flight -= 1
            series.observe((_perf_counter() - started) * 1000.0)

    # -- Shadow traffic: fire and forget, bounded, never awaited by the caller --

    def _shadow_predict(
        self, route: CompiledRoute, ctx: RequestContext, request: PredictInput, timeout_s: float
    ) -> None:
        for shadow in route.shadows:
            if shadow.threshold < BUCKETS and shadow.bucket(ctx.prediction_id) >= shadow.threshold:
                continue
            if len(self._shadow_tasks) >= self.shadow_max_in_flight or self._closed:
                shadow.arm.series.dropped += 1
                continue
            self._spawn(self._run_shadow_predict(route.model, shadow.arm, ctx, request, timeout_s))

    def _shadow_generate(self, route: CompiledRoute, ctx: RequestContext, request: GenerateInput) -> None:
        for shadow in route.shadows:
            if shadow.threshold < BUCKETS and shadow.bucket(ctx.prediction_id) >= shadow.threshold:
                continue
            if len(self._shadow_tasks) >= self.shadow_max_in_flight or self._closed:
                shadow.arm.series.dropped += 1
                continue
            self._spawn(self._run_shadow_generate(route.model, shadow.arm, ctx, request))

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow_predict(
        self, model: str, arm: Arm, ctx: RequestContext, request: PredictInput, timeout_s: float
    ) -> None:
        series = arm.series
        series.requests += 1
        series.in_flight += 1
        started, started_unix = _perf_counter(), time.time()
        result = ShadowResult(
            "Predict", model, arm.served_by, ctx.prediction_id, ctx.tenant, request, started_unix, 0.0
        )
        try:
            result.outputs = await self._infer(arm, request.inputs, request.outputs, ctx.prediction_id, timeout_s)
        except asyncio.CancelledError:
            series.in_flight -= 1
            raise
        except Exception as exc:
            result.error = _as_mesh_error(exc)
            series.errors += 1
        series.in_flight -= 1
        result.latency_ms = (_perf_counter() - started) * 1000.0
        series.observe(result.latency_ms)
        self._observe(result)

    async def _run_shadow_generate(self, model: str, arm: Arm, ctx: RequestContext, request: GenerateInput) -> None:
        series = arm.series
        series.requests += 1
        series.in_flight += 1
        started, started_unix = _perf_counter(), time.time()
        result = ShadowResult(
            "Generate", model, arm.served_by, ctx.prediction_id, ctx.tenant, request, started_unix, 0.0
        )
        text: list[str] = []
        target = arm.target
        try:
            async for token in self.backend.generate(
                target.triton_model, target.triton_version, request, ctx.prediction_id, ctx.timeout_s
            ):
                text.append(token.text)
                if token.final:
                    result.finish_reason = token.finish_reason
                    result.input_tokens, result.output_tokens = token.input_tokens, token.output_tokens
        except asyncio.CancelledError:
            series.in_flight -= 1
            raise
        except Exception as exc:
            result.error = _as_mesh_error(exc)
            series.errors += 1
        series.in_flight -= 1
        result.completion_text = "".join(text)
        result.latency_ms = (_perf_counter() - started) * 1000.0
        series.observe(result.latency_ms)
        self._observe(result)

    def _observe(self, result: ShadowResult) -> None:
        if self.observer is None:
            return
        try:
            self.observer.on_shadow_result(result)
        except Exception:  # an observer must never break serving
            log.exception("shadow observer %s failed", type(self.observer).__name__)

    @property
    def shadow_in_flight(self) -> int:
        return len(self._shadow_tasks)

    async def wait_shadows(self) -> None:
        """Until the shadow calls started so far have finished (for tests and orderly shutdown)."""
        while self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    # -- catalogue --

    async def list_models(self) -> list[ModelInfo]:
        models = []
        for route in list(self._routes.values()):
            arm = route.stable
            info = arm.info
            target = arm.target
            ready = info is not None and await self.backend.model_ready(target.triton_model, target.triton_version)
            models.append(
                ModelInfo(
                    name=route.model,
                    version=arm.served_by.model_version,
                    kind=route.kind,
                    inputs=info.inputs if info else (),
                    outputs=info.outputs if info else (),
                    max_batch_size=info.max_batch_size if info else 0,
                    ready=ready,
                )
            )
        return models

    async def refresh_model_info(self) -> bool:
        """Fetches tensor contracts of every target of the table; True once all are known."""
        complete, changed = True, False
        for key in _target_keys(self.table):
            try:
                info = await self.backend.model_info(*key)
            except errors.MeshError as exc:
                complete = False
                log.debug("model info for %s not available yet: %s", key[0], exc)
                continue
            if self._model_info.get(key) != info:
                self._model_info[key] = info
                changed = True
        if changed:
            self._compile()  # ServedBy versions and batchability may have changed
        return complete

    async def keep_model_info_fresh(self, interval_s: float) -> None:
        """Background task: learn contracts as models load (Triton may start after the router)."""
        while True:
            await self.refresh_model_info()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._shadow_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.close()

    def _resolve(self, model: str, kind: str) -> CompiledRoute:
        route = self._routes.get(model)
        if route is None:
            known = ", ".join(sorted(self._routes)) or "none"
            raise errors.NotFound(f"unknown model '{model}' (served models: {known})")
        if route.kind != kind:
            rpc = "Generate" if route.kind == MODEL_KIND_LLM else "Predict"
            raise errors.InvalidArgument(f"model: '{model}' is a {route.kind} model; call {rpc} instead")
        return route


def _count_failure(series: Series, breaker: CircuitBreaker | None, exc: errors.MeshError, elapsed_ms: float) -> bool:
    """Counts a failed call to a variant's target; True when the stable target may answer instead."""
    series.in_flight -= 1
    series.observe(elapsed_ms)
    if not isinstance(exc, errors.Cancelled):
        series.errors += 1
    if breaker is None:
        return False
    if not isinstance(exc, FALLBACK_ERRORS):
        breaker.release()
        return False
    breaker.record_failure()
    return True


def _as_mesh_error(exc: Exception) -> errors.MeshError:
    if isinstance(exc, errors.MeshError):
        return exc
    log.debug("shadow call failed unexpectedly", exc_info=exc)
    return errors.Internal(f"shadow call failed: {exc!r}")


def _target_keys(table: RouteTable) -> list[TargetKey]:
    keys: list[TargetKey] = []
    for route in table.routes:
        for target in route.targets():
            key = _key(target)
            if key not in keys:
                keys.append(key)
    return keys


def _describe(table: RouteTable) -> str:
    parts = []
    for route in table.routes:
        text = f"{route.model} -> {route.stable.triton_model}"
        if route.experiment is not None and route.experiment.variants:
            split = ", ".join(f"{v.name}={v.target.triton_model}:{v.weight:g}" for v in route.experiment.variants)
            text += f" [{route.experiment.name}: {split}; holdout {route.experiment.holdout_fraction:g}]"
        if route.shadows:
            text += " shadows " + ", ".join(f"{s.name}={s.target.triton_model}:{s.fraction:g}" for s in route.shadows)
        parts.append(text)
    return "; ".join(parts) or "no routes"
