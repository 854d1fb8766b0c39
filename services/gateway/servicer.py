"""gRPC transport for the public API: protobuf in, Gateway call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common import convert
from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.server import ServiceRegistration
from services.gateway.core import Gateway


def api_key_from(context: grpc.aio.ServicerContext) -> str | None:
    """Accepts `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Predict(
        self, request: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        result = await self.gateway.predict(
            api_key_from(context), convert.predict_input_from_pb(request), context.time_remaining()
        )
        return convert.predict_result_to_pb(result)

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        stream = self.gateway.generate(
            api_key_from(context), convert.generate_input_from_pb(request), context.time_remaining()
        )
        async for chunk, usage in stream:
            usage_pb = None
            if usage is not None:
                usage_pb = common_pb2.Usage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    time_to_first_token_ms=usage.time_to_first_token_ms,
                    total_time_ms=usage.total_time_ms,
                )
            yield convert.chunk_to_pb(chunk, usage_pb)

    async def Feedback(
        self, request: gateway_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.FeedbackResponse:
        feedback_id = await self.gateway.feedback(api_key_from(context), convert.feedback_input_from_pb(request))
        return gateway_pb2.FeedbackResponse(feedback_id=feedback_id)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        models = await self.gateway.list_models(api_key_from(context))
        return gateway_pb2.ListModelsResponse(models=[convert.model_info_to_pb(m) for m in models])


def registration(gateway: Gateway) -> ServiceRegistration:
    servicer = GatewayServicer(gateway)
    return ServiceRegistration(
        "mlmesh.v1.Gateway", lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    )
