"""The router's connection to Triton: one persistent grpc.aio channel, KServe v2 protos.

The hot path builds ModelInferRequest messages directly from raw tensor bytes (no numpy round
trip), using the service stubs that tritonclient.grpc ships. Predicts travel as messages on a
long-lived ModelStreamInfer stream per model (`InferStream`) rather than one unary call each:
measured against the real Triton here, a stream message costs ~50 us less CPU on each side and
~160 us less wall time than a unary ModelInfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections import OrderedDict
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


def model_deadline_exceeded(model: str) -> errors.DeadlineExceeded:
    return errors.DeadlineExceeded(f"model '{model}' did not answer before the deadline")


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
        return model_deadline_exceeded(model)
    if code == grpc.StatusCode.CANCELLED:
        return errors.Cancelled(f"call to model '{model}' was cancelled")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(f"model '{model}' rejected the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(f"model '{model}' is overloaded: {details}", retry_after_s=0.1)
    return errors.Internal(f"model '{model}' failed: {details}")


# A stream reports a failed request as text only (no status code): these phrases are Triton's
# request-validation errors, which unary calls get as INVALID_ARGUMENT.
_INVALID_REQUEST_PHRASES = (
    "unexpected shape",
    "data-type is",
    "byte size mismatch",
    "batch-size must be",
    "unexpected inference input",
    "unexpected inference output",
    "inputs but got",
)


def stream_error(message: str, model: str) -> errors.MeshError:
    """Maps the error text of one request on a ModelStreamInfer stream to the unary call's status."""
    lowered = message.lower()
    if "unknown model" in lowered or "is not found" in lowered:
        return errors.NotFound(f"model '{model}' is not loaded in the inference server")
    if "exceeds maximum queue size" in lowered:
        return errors.ResourceExhausted(f"model '{model}' is overloaded: {message}", retry_after_s=0.1)
    if any(phrase in lowered for phrase in _INVALID_REQUEST_PHRASES):
        return errors.InvalidArgument(f"model '{model}' rejected the request: {message}")
    return errors.Internal(f"model '{model}' failed: {message}")


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


# Streams kept open at once; the least recently used one is closed beyond this (a registry
# gives every version its own Triton model, so old versions' streams must not pile up).
DEFAULT_MAX_OPEN_STREAMS = 32


class InferStream:
    """One ModelStreamInfer call that carries many non-decoupled inferences, matched by request id.

    Triton writes a stream's responses in request order, so a slow model would hold up every
    model behind it on a shared stream: the backend opens one stream per model and version.

    Writes are serialized (grpc allows one outstanding write per call); one reader task hands each
    response to its waiter. Deadlines are the client's: a late answer is dropped on arrival
    (Triton still computes it). When the stream breaks, every waiter fails with UNAVAILABLE and
    the backend opens a new stream for the next request.
    """

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, url: str) -> None:
        self.url = url
        self.closed = False
        self._call = stub.ModelStreamInfer()
        self._write_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future[service_pb2.ModelStreamInferResponse]] = {}
        self._ids = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def infer(
        self, request: service_pb2.ModelInferRequest, model: str, timeout_s: float | None
    ) -> service_pb2.ModelInferResponse:
        # The caller's id stays readable in Triton's messages; the suffix makes it unique here.
        request.id = key = f"{request.id}#{next(self._ids)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[service_pb2.ModelStreamInferResponse] = loop.create_future()
        self._waiters[key] = future
        timer = None
        if timeout_s is not None:
            timer = loop.call_later(max(timeout_s, 0.0), _expire_stream_waiter, future, model)
        try:
            try:
                async with self._write_lock:
                    await self._call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                self.closed = True
                raise errors.Unavailable(f"inference server at {self.url} is unavailable: {exc}") from None
            message = await future  # a reader that ends fails every registered waiter, this one too
        finally:
            self._waiters.pop(key, None)
            if timer is not None:
                timer.cancel()
        if message.error_message:
            raise stream_error(message.error_message, model)
        return message.infer_response

    async def _read(self) -> None:
        failure: errors.MeshError = errors.Unavailable(f"inference server at {self.url} closed the stream")
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    return
                future = self._waiters.pop(message.infer_response.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
        except grpc.aio.AioRpcError as exc:
            reason = exc.details() or exc.code().name
            failure = errors.Unavailable(f"inference server at {self.url} is unavailable: {reason}")
        except (asyncio.CancelledError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # closed by us
        finally:
            self.closed = True
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(failure)
            self._waiters.clear()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Half-closes (Triton answers what it has, then ends the stream); cancels if it lingers."""
        self.closed = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                async with self._write_lock:
                    await self._call.done_writing()
                await asyncio.shield(self._reader)
        if not self._reader.done():
            self._call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _expire_stream_waiter(future: asyncio.Future, model: str) -> None:
    if not future.done():
        future.set_exception(model_deadline_exceeded(model))


class TritonBackend:
    """Talks to one Triton server. Create once; every call reuses its channel.

    `predict_stream` (the default) sends Predicts over one `InferStream`; False sends each as a
    unary ModelInfer (Triton then also sees the caller's deadline).
    """

    def __init__(self, url: str, predict_stream: bool = True, max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS) -> None:
        self.url = url
        self.predict_stream = predict_stream
        self.max_open_streams = max_open_streams
        self._channel = internal_channel(url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._streams: OrderedDict[tuple[str, str], InferStream] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), OrderedDict()
        await asyncio.gather(*(stream.close() for stream in streams), *self._closing)
        await self._channel.close()

    def _stream_for(self, model: str, version: str) -> InferStream:
        key = (model, version)
        stream = self._streams.get(key)
        if stream is not None and not stream.closed:
            self._streams.move_to_end(key)
            return stream
        stream = self._streams[key] = InferStream(self._stub, self.url)
        self._streams.move_to_end(key)
        if len(self._streams) > self.max_open_streams:
            _, oldest = self._streams.popitem(last=False)
            task = asyncio.get_running_loop().create_task(oldest.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return stream

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
        if self.predict_stream:
            response = await self._stream_for(model, version).infer(request, model, timeout_s)
        else:
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
