"""gRPC transport for the router: protobuf in, RouterCore call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common import convert
from services.common.api import common_pb2, gateway_pb2, router_pb2, router_pb2_grpc
from services.common.domain import RequestContext
from services.common.server import ServiceRegistration
from services.router.core import RouterCore


def _context(route_ctx: router_pb2.RouteContext, context: grpc.aio.ServicerContext) -> RequestContext:
    return RequestContext(route_ctx.prediction_id, route_ctx.tenant, context.time_remaining())


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Predict(
        self, request: router_pb2.RoutePredictRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        result = await self.core.predict(
            _context(request.context, context), convert.predict_input_from_pb(request.request)
        )
        return convert.predict_result_to_pb(result)

    async def Generate(
        self, request: router_pb2.RouteGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        ctx = _context(request.context, context)
        async for chunk in self.core.generate(ctx, convert.generate_input_from_pb(request.request)):
            usage = None
            if chunk.finish_reason:
                usage = common_pb2.Usage(input_tokens=chunk.input_tokens, output_tokens=chunk.output_tokens)
            yield convert.chunk_to_pb(chunk, usage)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        models = await self.core.list_models()
        return gateway_pb2.ListModelsResponse(models=[convert.model_info_to_pb(m) for m in models])


def registration(core: RouterCore) -> ServiceRegistration:
    servicer = RouterServicer(core)
    return ServiceRegistration(
        "mlmesh.v1.Router", lambda server: router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    )
