"""Gateway logic, free of transport: authenticate, limit, validate, route, account."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from services.common import errors, telemetry
from services.common.domain import (
    FeedbackInput,
    GenerateChunk,
    GenerateInput,
    GenerationUsage,
    ModelInfo,
    PredictInput,
    PredictResult,
    RequestContext,
)
from services.gateway.hooks import CompletedRequest, FeedbackRecord, GatewayHook
from services.gateway.keys import Authenticator
from services.gateway.ratelimit import TenantRateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.validation import validate_feedback, validate_generate, validate_predict

log = logging.getLogger(__name__)


class RouterPort(Protocol):
    """What the gateway needs from a router: the in-process RouterCore or a gRPC client."""

    async def predict(self, ctx: RequestContext, request: PredictInput) -> PredictResult: ...

    def generate(self, ctx: RequestContext, request: GenerateInput) -> AsyncIterator[GenerateChunk]: ...

    async def list_models(self) -> list[ModelInfo]: ...


def new_prediction_id() -> str:
    return os.urandom(16).hex()  # 128 random bits, as uuid4().hex but without building a UUID


class Gateway:
    def __init__(
        self,
        router: RouterPort,
        auth: Authenticator,
        limiter: TenantRateLimiter,
        settings: GatewaySettings,
        hooks: Sequence[GatewayHook] = (),
    ) -> None:
        self.router = router
        self.auth = auth
        self.limiter = limiter
        self.settings = settings
        self.hooks = list(hooks)
        self._models: dict[str, ModelInfo] = {}
        self._refreshed_at = 0.0

    # -- model catalogue (cached; refreshed in the background, never per request) --

    async def refresh_models(self) -> None:
        self._refreshed_at = time.monotonic()
        self._models = {m.name: m for m in await self.router.list_models()}

    async def keep_models_fresh(self, interval_s: float) -> None:
        while True:
            try:
                await self.refresh_models()
            except errors.MeshError as exc:
                log.debug("model catalogue refresh failed: %s", exc)
            await asyncio.sleep(interval_s)

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        await self.auth.authenticate(api_key)
        await self.refresh_models()
        return list(self._models.values())

    async def _model(self, name: str) -> ModelInfo:
        if not name:
            raise errors.InvalidArgument("model: must not be empty")
        model = self._models.get(name)
        # A miss may be a model that just loaded; look again, but at most once a second so a
        # flood of requests for unknown models cannot turn into a flood of catalogue calls.
        if (model is None or not model.inputs) and time.monotonic() - self._refreshed_at >= 1.0:
            await self.refresh_models()
            model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise errors.NotFound(f"model: unknown model '{name}' (served models: {known})")
        if not model.inputs:
            raise errors.Unavailable(f"model '{name}' is not loaded yet; retry shortly")
        return model

    def _timeout(self, remaining_s: float | None, default_s: float) -> float:
        if remaining_s is None:
            return default_s
        if remaining_s <= 0:
            raise errors.DeadlineExceeded("deadline expired before the request was processed")
        return remaining_s

    # -- Predict --

    async def predict(self, api_key: str | None, request: PredictInput, remaining_s: float | None) -> PredictResult:
        started, started_unix = time.perf_counter(), time.time()
        tenant = await self.auth.authenticate(api_key)
        self.limiter.admit_request(tenant)
        ctx = RequestContext(
            new_prediction_id(), tenant.name, self._timeout(remaining_s, self.settings.predict_timeout_s)
        )
        result: PredictResult | None = None
        error: errors.MeshError | None = None
        try:
            model = await self._model(request.model)
            if model.kind != "tabular":
                raise errors.InvalidArgument(f"model: '{request.model}' is an LLM; call Generate instead")
            validate_predict(request, model, self.settings.request_limits)
            for hook in self.hooks:
                await hook.check_input(tenant, request)
            result = await self.router.predict(ctx, request)
            for hook in self.hooks:
                await hook.check_output(tenant, request, result)
            return result
        except errors.MeshError as exc:
            error = exc
            raise
        finally:
            if self.hooks:
                self._notify(
                    CompletedRequest(
                        prediction_id=ctx.prediction_id,
                        tenant=tenant.name,
                        rpc="Predict",
                        request=request,
                        served_by=result.served_by if result else None,
                        status=error.status if error else "OK",
                        error=error.message if error else "",
                        started_at_unix=started_unix,
                        latency_ms=(time.perf_counter() - started) * 1000,
                        trace_id=telemetry.current_trace_id(),
                        result=result,
                    )
                )

    # -- Generate --

    async def generate(
        self, api_key: str | None, request: GenerateInput, remaining_s: float | None
    ) -> AsyncIterator[tuple[GenerateChunk, GenerationUsage | None]]:
        started, started_unix = time.perf_counter(), time.time()
        tenant = await self.auth.authenticate(api_key)
        self.limiter.admit_request(tenant)
        self.limiter.admit_generation(tenant)
        request = validate_generate(request, self.settings.request_limits)
        ctx = RequestContext(
            new_prediction_id(), tenant.name, self._timeout(remaining_s, self.settings.generate_timeout_s)
        )
        for hook in self.hooks:
            await hook.check_input(tenant, request)
        first_token_at: float | None = None
        last: GenerateChunk | None = None
        text: list[str] = []
        error: errors.MeshError | None = None
        status = "OK"
        try:
            async for chunk in self.router.generate(ctx, request):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                last = chunk
                if self.hooks:
                    text.append(chunk.text)
                    for hook in self.hooks:
                        await hook.check_generated_text(tenant, request, "".join(text))
                usage = None
                if chunk.finish_reason:
                    usage = self._usage(chunk, started, first_token_at)
                yield chunk, usage
        except errors.MeshError as exc:
            error, status = exc, exc.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        finally:
            output_tokens = last.output_tokens if last else 0
            input_tokens = last.input_tokens if last else 0
            self.limiter.charge_tokens(tenant, input_tokens + output_tokens)
            if self.hooks:
                self._notify(
                    CompletedRequest(
                        prediction_id=ctx.prediction_id,
                        tenant=tenant.name,
                        rpc="Generate",
                        request=request,
                        served_by=last.served_by if last else None,
                        status=status,
                        error=error.message if error else "",
                        started_at_unix=started_unix,
                        latency_ms=(time.perf_counter() - started) * 1000,
                        trace_id=telemetry.current_trace_id(),
                        completion_text="".join(text),
                        finish_reason=last.finish_reason if last else "",
                        usage=self._usage(last, started, first_token_at) if last else None,
                    )
                )

    # -- Feedback --

    async def feedback(self, api_key: str | None, feedback: FeedbackInput) -> str:
        tenant = await self.auth.authenticate(api_key)
        self.limiter.admit_request(tenant)
        validate_feedback(feedback, self.settings.request_limits)
        record = FeedbackRecord(
            feedback_id=uuid.uuid4().hex,
            prediction_id=feedback.prediction_id,
            tenant=tenant.name,
            unit_id=feedback.unit_id,
            created_at_unix=time.time(),
            label=feedback.label,
            rating=feedback.rating,
            outcome=feedback.outcome,
            text=feedback.text,
            trace_id=telemetry.current_trace_id(),
        )
        publishers = [hook for hook in self.hooks if hook.accepts_feedback]
        if not publishers:
            raise errors.FailedPrecondition(
                "feedback needs event emission: enable it with MLMESH_GATEWAY_EVENTS__ENABLED=true"
            )
        if not any([hook.on_feedback(record) for hook in publishers]):
            raise errors.ResourceExhausted("the event queue is full; retry shortly", retry_after_s=1.0)
        return record.feedback_id

    @staticmethod
    def _usage(chunk: GenerateChunk, started: float, first_token_at: float | None) -> GenerationUsage:
        now = time.perf_counter()
        return GenerationUsage(
            input_tokens=chunk.input_tokens,
            output_tokens=chunk.output_tokens,
            time_to_first_token_ms=((first_token_at or now) - started) * 1000,
            total_time_ms=(now - started) * 1000,
        )

    def _notify(self, record: CompletedRequest) -> None:
        for hook in self.hooks:
            try:
                hook.on_complete(record)
            except Exception:  # an observer must never break serving
                log.exception("gateway hook %s failed", type(hook).__name__)
