"""Routing logic, free of transport: resolve a public model name, call Triton, shape results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
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
)
from services.router.batching import PredictBatcher
from services.router.settings import RouteConfig
from services.router.triton import TritonBackend, TritonModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    public_name: str
    triton_model: str
    version: str
    kind: str


class RoutingTable:
    """Public model name -> deployed Triton model. Replaced atomically as a whole."""

    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self._routes: dict[str, Route] = {}
        self.replace(routes)

    def replace(self, routes: Mapping[str, RouteConfig]) -> None:
        self._routes = {name: Route(name, cfg.triton_model, cfg.version, cfg.kind) for name, cfg in routes.items()}

    def resolve(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is None:
            known = ", ".join(sorted(self._routes)) or "none"
            raise errors.NotFound(f"unknown model '{model}' (served models: {known})")
        return route

    def routes(self) -> list[Route]:
        return list(self._routes.values())


class RouterCore:
    def __init__(
        self,
        backend: TritonBackend,
        table: RoutingTable,
        default_timeout_s: float = 30.0,
        batch_max_in_flight: int = 1,
    ) -> None:
        self.backend = backend
        self.table = table
        self.default_timeout_s = default_timeout_s
        self._model_info: dict[str, TritonModelInfo] = {}
        # 0 disables coalescing: every Predict is its own Triton call.
        self._batcher = PredictBatcher(backend, batch_max_in_flight) if batch_max_in_flight > 0 else None

    async def predict(self, ctx: RequestContext, request: PredictInput) -> PredictResult:
        route = self._route_of_kind(request.model, MODEL_KIND_TABULAR)
        timeout = ctx.timeout_s or self.default_timeout_s
        info = self._model_info.get(route.triton_model)
        if self._batcher is not None and info is not None and info.batchable:
            outputs = await self._batcher.infer(
                route.triton_model,
                route.version,
                info.max_batch_size,
                request.inputs,
                request.outputs,
                ctx.prediction_id,
                timeout,
            )
        else:
            outputs = await self.backend.infer(
                route.triton_model, route.version, request.inputs, request.outputs, ctx.prediction_id, timeout
            )
        return PredictResult(ctx.prediction_id, self._served_by(route), outputs)

    async def generate(self, ctx: RequestContext, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        route = self._route_of_kind(request.model, MODEL_KIND_LLM)
        served_by = self._served_by(route)
        index = 0
        async for token in self.backend.generate(
            route.triton_model, route.version, request, ctx.prediction_id, ctx.timeout_s
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

    async def list_models(self) -> list[ModelInfo]:
        models = []
        for route in self.table.routes():
            info = self._model_info.get(route.triton_model)
            ready = info is not None and await self.backend.model_ready(route.triton_model, route.version)
            models.append(
                ModelInfo(
                    name=route.public_name,
                    version=route.version or (info.version if info else ""),
                    kind=route.kind,
                    inputs=info.inputs if info else (),
                    outputs=info.outputs if info else (),
                    max_batch_size=info.max_batch_size if info else 0,
                    ready=ready,
                )
            )
        return models

    async def refresh_model_info(self) -> bool:
        """Fetches tensor contracts of every routed model; True once all are known."""
        complete = True
        for route in self.table.routes():
            try:
                self._model_info[route.triton_model] = await self.backend.model_info(route.triton_model, route.version)
            except errors.MeshError as exc:
                complete = False
                log.debug("model info for %s not available yet: %s", route.triton_model, exc)
        return complete

    async def keep_model_info_fresh(self, interval_s: float) -> None:
        """Background task: learn contracts as models load (Triton may start after the router)."""
        while True:
            await self.refresh_model_info()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self.backend.close()

    def _route_of_kind(self, model: str, kind: str) -> Route:
        route = self.table.resolve(model)
        if route.kind != kind:
            rpc = "Generate" if route.kind == MODEL_KIND_LLM else "Predict"
            raise errors.InvalidArgument(f"model: '{model}' is a {route.kind} model; call {rpc} instead")
        return route

    def _served_by(self, route: Route) -> ServedBy:
        version = route.version
        if not version:
            info = self._model_info.get(route.triton_model)
            version = info.version if info else ""
        return ServedBy(route.public_name, version)
