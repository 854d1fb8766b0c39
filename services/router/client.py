"""The router seen from the gateway when they run in separate processes (one reused channel)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common import convert, telemetry
from services.common.api import gateway_pb2, router_pb2, router_pb2_grpc
from services.common.channels import internal_channel
from services.common.domain import (
    GenerateChunk,
    GenerateInput,
    ModelInfo,
    PredictInput,
    PredictResult,
    RequestContext,
    ServedBy,
)
from services.common.server import error_from_rpc


class GrpcRouterClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = internal_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def predict(self, ctx: RequestContext, request: PredictInput) -> PredictResult:
        message = router_pb2.RoutePredictRequest(
            context=router_pb2.RouteContext(prediction_id=ctx.prediction_id, tenant=ctx.tenant),
            request=convert.predict_input_to_pb(request),
        )
        try:
            response = await self._stub.Predict(message, timeout=ctx.timeout_s, metadata=telemetry.trace_metadata())
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"router at {self.address}") from None
        return convert.predict_result_from_pb(response)

    async def generate(self, ctx: RequestContext, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        message = router_pb2.RouteGenerateRequest(
            context=router_pb2.RouteContext(prediction_id=ctx.prediction_id, tenant=ctx.tenant),
            request=convert.generate_input_to_pb(request),
        )
        call = self._stub.Generate(message, timeout=ctx.timeout_s, metadata=telemetry.trace_metadata())
        served_by = ServedBy(request.model, "")
        try:
            async for response in call:
                chunk = convert.chunk_from_pb(response, served_by)
                served_by = chunk.served_by
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"router at {self.address}") from None
        finally:
            call.cancel()

    async def list_models(self) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"router at {self.address}") from None
        return [convert.model_info_from_pb(m) for m in response.models]

    async def close(self) -> None:
        await self._channel.close()
