"""The router's connection to Triton: one persistent grpc.aio channel, KServe v2 protos.

The hot path builds ModelInferRequest messages directly from raw tensor bytes (no numpy round
trip), using the service stubs that tritonclient.grpc ships.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common import errors
from services.common.channels import internal_channel
from services.common.domain import GenerateInput, TensorData, TensorSpec


@dataclass(frozen=True, slots=True)
class TritonModelInfo:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    decoupled: bool

    @property
    def batchable(self) -> bool:
        """Requests can be merged row-wise: a batch dimension and fixed-size elements throughout."""
        tensors = (*self.inputs, *self.outputs)
        return self.max_batch_size > 0 and not self.decoupled and all(t.dtype != "BYTES" for t in tensors)


@dataclass(slots=True)
class TritonToken:
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    final: bool


def _backend_error(exc: grpc.aio.AioRpcError, model: str, url: str) -> errors.MeshError:
    code, details = exc.code(), exc.details() or ""
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE and ("unknown model" in lowered or "not found" in lowered):
        return errors.NotFound(f"model '{model}' is not loaded in the inference server")
    if code == grpc.StatusCode.NOT_FOUND or "unknown model" in lowered:
        return errors.NotFound(f"model '{model}' is not loaded in the inference server")
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"inference server at {url} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"model '{model}' did not answer before the deadline")
    if code == grpc.StatusCode.CANCELLED:
        return errors.Cancelled(f"call to model '{model}' was cancelled")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(f"model '{model}' rejected the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(f"model '{model}' is overloaded: {details}", retry_after_s=0.1)
    return errors.Internal(f"model '{model}' failed: {details}")


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element is a uint32 LE length then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset : offset + length])
        offset += length
    return items


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


class TritonBackend:
    """Talks to one Triton server. Create once; every call reuses its channel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel = internal_channel(url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def server_ready(self, timeout_s: float = 1.0) -> bool:
        try:
            response = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return response.ready

    async def model_ready(self, model: str, version: str = "", timeout_s: float = 2.0) -> bool:
        try:
            response = await self._stub.ModelReady(
                service_pb2.ModelReadyRequest(name=model, version=version), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return response.ready

    async def model_info(self, model: str, version: str = "", timeout_s: float = 5.0) -> TritonModelInfo:
        try:
            metadata = await self._stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model, version=version), timeout=timeout_s
            )
            config = await self._stub.ModelConfig(
                service_pb2.ModelConfigRequest(name=model, version=version), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _backend_error(exc, model, self.url) from None

        def specs(tensors: list) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

        cfg = config.config
        return TritonModelInfo(
            name=model,
            version=version or (max(metadata.versions, key=int) if metadata.versions else ""),
            inputs=specs(metadata.inputs),
            outputs=specs(metadata.outputs),
            max_batch_size=cfg.max_batch_size,
            decoupled=cfg.model_transaction_policy.decoupled,
        )

    async def infer(
        self,
        model: str,
        version: str,
        inputs: list[TensorData],
        outputs: list[str],
        request_id: str,
        timeout_s: float | None,
    ) -> list[TensorData]:
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for tensor in inputs:
            spec = request.inputs.add()
            spec.name = tensor.name
            spec.datatype = tensor.dtype
            spec.shape.extend(tensor.shape)
        request.raw_input_contents.extend(t.data for t in inputs)
        for name in outputs:
            request.outputs.add().name = name
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _backend_error(exc, model, self.url) from None
        return [
            TensorData(out.name, out.datatype, tuple(out.shape), raw)
            for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        ]

    async def generate(
        self, model: str, version: str, request: GenerateInput, request_id: str, timeout_s: float | None
    ) -> AsyncIterator[TritonToken]:
        """Streams one generation. Leaving the loop early cancels the call, which stops the model."""
        infer = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        _add_input(infer, "prompt", "BYTES", encode_bytes_tensor([request.prompt.encode()]))
        if request.max_tokens:
            _add_input(infer, "max_tokens", "INT32", struct.pack("<i", request.max_tokens))
        if request.temperature:
            _add_input(infer, "temperature", "FP32", struct.pack("<f", request.temperature))
        if request.top_p:
            _add_input(infer, "top_p", "FP32", struct.pack("<f", request.top_p))
        if request.seed:
            _add_input(infer, "seed", "INT64", struct.pack("<q", request.seed))

        done = asyncio.Event()

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield infer
            # Keep our side open until the final response: Triton ends the stream on half-close.
            await done.wait()

        call = self._stub.ModelStreamInfer(requests(), timeout=timeout_s)
        finished = False
        try:
            async for message in call:
                if message.error_message:
                    raise errors.Internal(f"model '{model}' failed: {message.error_message}")
                token = _parse_token(message.infer_response)
                if token.final:
                    # Close the stream the polite way (half-close, let Triton end it): cancelling a
                    # finished stream can leave the model stuck when it is later unloaded.
                    done.set()
                    await self._drain(call)
                    finished = True
                    yield token
                    return
                yield token
            raise errors.Unavailable(f"inference server at {self.url} closed the stream early")
        except grpc.aio.AioRpcError as exc:
            raise _backend_error(exc, model, self.url) from None
        finally:
            done.set()
            if not finished:
                call.cancel()  # the caller left early: cancelling stops generation in the model

    @staticmethod
    async def _drain(call: grpc.aio.StreamStreamCall, timeout_s: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in call:
                    pass
        except (TimeoutError, grpc.aio.AioRpcError):
            call.cancel()


def _add_input(request: service_pb2.ModelInferRequest, name: str, dtype: str, raw: bytes) -> None:
    spec = request.inputs.add()
    spec.name = name
    spec.datatype = dtype
    spec.shape.append(1)
    request.raw_input_contents.append(raw)


def _parse_token(response: service_pb2.ModelInferResponse) -> TritonToken:
    values: dict[str, bytes] = {
        out.name: raw for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }

    def text(name: str) -> str:
        raw = values.get(name)
        return decode_bytes_tensor(raw)[0].decode("utf-8", "replace") if raw else ""

    def int32(name: str) -> int:
        raw = values.get(name)
        return struct.unpack_from("<i", raw)[0] if raw else 0

    final_param = response.parameters.get("triton_final_response")
    return TritonToken(
        text=text("text"),
        finish_reason=text("finish_reason"),
        input_tokens=int32("input_tokens"),
        output_tokens=int32("output_tokens"),
        final=bool(final_param and final_param.bool_param),
    )
