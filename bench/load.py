"""Load-generator processes: grpc.aio clients, one channel per target per process.

The harness starts ClientPool workers with multiprocessing's `spawn` (fresh interpreters; no
gRPC state is ever forked) and sends them commands over a pipe. A worker keeps one channel per
target for its whole life, so warm-up covers connection setup once and every cell reuses it.

Unary cell: N coroutines, each in a closed loop (send, await the reply, send again) on the one
channel. Requests that start during the warm-up are not recorded; every request that starts in
the measured window is, with its latency. Errors are counted in both phases.
Streaming: sequential generations, one target after the other (alternating which goes first),
recording time to the first streamed message, the total time and the generated token count.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import Any

# Kinds of target: how to call it.
KIND_KSERVE = "kserve"  # KServe v2 ModelInfer: direct Triton and MLServer
KIND_ROUTER = "router"  # mlmesh.v1.Router/Predict (internal, no auth)
KIND_GATEWAY = "gateway"  # mlmesh.v1.Gateway/Predict (public, Bearer key)
RPC_TIMEOUT_S = 30.0
MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    address: str
    model: str
    api_key: str = ""


@dataclass
class UnaryResult:
    target: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    window_s: float = 0.0
    errors: int = 0
    warmup_errors: int = 0
    warmup_requests: int = 0
    error_samples: list[str] = field(default_factory=list)


@dataclass
class StreamSample:
    target: str
    ttft_s: float
    total_s: float
    output_tokens: int
    messages: int
    text: str


@dataclass
class StreamResult:
    samples: list[StreamSample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)


def build_unary_request(target: Target, features: bytes) -> Any:
    """The request message for one single-row prediction on `target` (built once, sent many times)."""
    shape, raw = [1, len(features) // 4], features
    if target.kind == KIND_KSERVE:
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name=target.model)
        tensor = request.inputs.add()
        tensor.name = "features"
        tensor.datatype = "FP32"
        tensor.shape.extend(shape)
        request.raw_input_contents.append(raw)
        for name in ("label", "probabilities"):
            request.outputs.add().name = name
        return request
    from services.common.api import common_pb2, gateway_pb2, router_pb2

    predict = gateway_pb2.PredictRequest(
        model=target.model,
        inputs=[common_pb2.Tensor(name="features", dtype="FP32", shape=shape, raw_data=raw)],
    )
    if target.kind == KIND_GATEWAY:
        return predict
    return router_pb2.RoutePredictRequest(
        context=router_pb2.RouteContext(prediction_id="bench", tenant="bench"), request=predict
    )


def _unary_method(channel: Any, kind: str) -> Any:
    if kind == KIND_KSERVE:
        from tritonclient.grpc import service_pb2_grpc

        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    from services.common.api import gateway_pb2_grpc, router_pb2_grpc

    if kind == KIND_GATEWAY:
        return gateway_pb2_grpc.GatewayStub(channel).Predict
    return router_pb2_grpc.RouterStub(channel).Predict


def _outputs_of(kind: str, response: Any) -> int:
    return len(response.raw_output_contents) if kind == KIND_KSERVE else len(response.outputs)


def _metadata(target: Target) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {target.api_key}"),) if target.api_key else None


class _Worker:
    def __init__(self) -> None:
        import grpc

        self._grpc = grpc
        self._channels: dict[str, Any] = {}

    def channel(self, address: str) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def unary(
        self, target: Target, features: bytes, concurrency: int, start_at: float, warmup_s: float, duration_s: float
    ) -> UnaryResult:
        grpc = self._grpc
        call = _unary_method(self.channel(target.address), target.kind)
        request = build_unary_request(target, features)
        metadata = _metadata(target)
        kind = target.kind
        result = UnaryResult(target.name, concurrency)
        clock = time.perf_counter
        # perf_counter is CLOCK_MONOTONIC on Linux: the same timeline in every worker process.
        delay = start_at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        measure_from = start_at + warmup_s
        stop_at = measure_from + duration_s
        latencies = result.latencies_s
        last_done = [measure_from]

        def record_error(started: float, message: str) -> None:
            if started >= measure_from:
                result.errors += 1
            else:
                result.warmup_errors += 1
            if len(result.error_samples) < MAX_ERROR_SAMPLES:
                result.error_samples.append(f"{target.name}: {message}")

        async def closed_loop() -> None:
            while True:
                started = clock()
                if started >= stop_at:
                    return
                try:
                    response = await call(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    record_error(started, f"{error.code().name}: {error.details()}")
                    continue
                done = clock()
                if _outputs_of(kind, response) != 2:
                    record_error(started, f"unexpected response with {_outputs_of(kind, response)} outputs")
                    continue
                if started >= measure_from:
                    latencies.append(done - started)
                    last_done[0] = max(last_done[0], done)
                else:
                    result.warmup_requests += 1

        await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
        result.window_s = max(last_done[0], stop_at) - measure_from
        return result

    async def stream_one(self, target: Target, prompt: str, max_tokens: int) -> StreamSample:
        if target.kind == KIND_KSERVE:
            return await self._stream_triton(target, prompt, max_tokens)
        return await self._stream_gateway(target, prompt, max_tokens)

    async def _stream_triton(self, target: Target, prompt: str, max_tokens: int) -> StreamSample:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel(target.address))
        request = service_pb2.ModelInferRequest(model_name=target.model)
        encoded = prompt.encode()
        for name, dtype, raw in (
            ("prompt", "BYTES", struct.pack("<I", len(encoded)) + encoded),
            ("max_tokens", "INT32", struct.pack("<i", max_tokens)),
        ):
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, dtype
            tensor.shape.append(1)
            request.raw_input_contents.append(raw)
        clock = time.perf_counter
        started = clock()
        first: float | None = None
        messages, output_tokens, text = 0, 0, []
        total = 0.0
        call = stub.ModelStreamInfer(timeout=RPC_TIMEOUT_S * 10)
        finished = False
        try:
            await call.write(request)
            async for message in call:
                now = clock()
                if first is None:
                    first = now
                if message.error_message:
                    raise RuntimeError(f"{target.name}: {message.error_message}")
                messages += 1
                response = message.infer_response
                values = dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))
                if values.get("text"):
                    text.append(values["text"][4:].decode("utf-8", "replace"))
                if values.get("output_tokens"):
                    output_tokens = struct.unpack_from("<i", values["output_tokens"])[0]
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    total = now - started
                    break
            else:
                raise RuntimeError(f"{target.name}: stream ended without a final response")
            # End the stream the clean way (half-close, let Triton close it). Cancelling a decoupled
            # stream right after its final response can leave the model pinned in Triton, so that
            # unload/shutdown waits for the full exit timeout (seen here; see bench/README.md).
            await call.done_writing()
            async for _ in call:
                pass
            finished = True
        finally:
            if not finished:
                call.cancel()
        return StreamSample(target.name, (first or started) - started, total, output_tokens, messages, "".join(text))

    async def _stream_gateway(self, target: Target, prompt: str, max_tokens: int) -> StreamSample:
        from services.common.api import common_pb2, gateway_pb2, gateway_pb2_grpc

        stub = gateway_pb2_grpc.GatewayStub(self.channel(target.address))
        request = gateway_pb2.GenerateRequest(
            model=target.model, prompt=prompt, params=common_pb2.GenerationParams(max_tokens=max_tokens)
        )
        clock = time.perf_counter
        started = clock()
        first: float | None = None
        messages, output_tokens, text = 0, 0, []
        total = 0.0
        async for message in stub.Generate(request, metadata=_metadata(target), timeout=RPC_TIMEOUT_S * 10):
            now = clock()
            if first is None:
                first = now
            messages += 1
            text.append(message.text)
            if message.finish_reason:
                output_tokens = message.usage.output_tokens
                total = now - started
        if not total:
            raise RuntimeError(f"{target.name}: stream ended without finish_reason")
        return StreamSample(target.name, (first or started) - started, total, output_tokens, messages, "".join(text))

    async def stream(
        self, targets: list[Target], prompt: str, max_tokens: int, warmup: int, requests: int
    ) -> StreamResult:
        result = StreamResult()
        for index in range(warmup + requests):
            # Alternate which target goes first, so neither always runs right after the other.
            order = targets if index % 2 == 0 else list(reversed(targets))
            for target in order:
                try:
                    sample = await self.stream_one(target, prompt, max_tokens)
                except (self._grpc.aio.AioRpcError, RuntimeError) as error:
                    result.errors[target.name] = result.errors.get(target.name, 0) + 1
                    if len(result.error_samples) < MAX_ERROR_SAMPLES:
                        result.error_samples.append(f"{target.name}: {error!r}"[:500])
                    continue
                if index >= warmup:
                    result.samples.append(sample)
        return result


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    worker = _Worker()
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                command = await loop.run_in_executor(None, conn.recv)
            except EOFError:  # the harness is gone
                return
            op = command.pop("op")
            if op == "stop":
                return
            try:
                if op == "unary":
                    reply: Any = await worker.unary(**command)
                elif op == "stream":
                    reply = await worker.stream(**command)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as error:
                reply = error
            conn.send(reply)
    finally:
        await worker.close()


def worker_main(conn: multiprocessing.connection.Connection) -> None:
    # Ctrl-C goes to the harness, which stops the workers; they must not die half-way on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(conn))


class ClientPool:
    """`processes` spawned load-generator processes; a cell's concurrency is split among them."""

    def __init__(self, processes: int = 1) -> None:
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        for index in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(child_end,), name=f"bench-client-{index}", daemon=True)
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def _collect(self, conns: list[multiprocessing.connection.Connection]) -> list[Any]:
        replies = []
        for conn in conns:
            reply = conn.recv()
            if isinstance(reply, Exception):
                raise RuntimeError(f"load generator failed: {reply!r}") from reply
            replies.append(reply)
        return replies

    def unary(
        self, target: Target, features: bytes, concurrency: int, warmup_s: float, duration_s: float
    ) -> UnaryResult:
        workers = self._workers[: max(1, min(len(self._workers), concurrency))]
        base, extra = divmod(concurrency, len(workers))
        shares = [base + (1 if i < extra else 0) for i in range(len(workers))]
        start_at = time.perf_counter() + 0.05 * len(workers)
        conns = []
        for (_, conn), share in zip(workers, shares, strict=True):
            conn.send(
                {
                    "op": "unary",
                    "target": target,
                    "features": features,
                    "concurrency": share,
                    "start_at": start_at,
                    "warmup_s": warmup_s,
                    "duration_s": duration_s,
                }
            )
            conns.append(conn)
        merged = UnaryResult(target.name, concurrency)
        for part in self._collect(conns):
            merged.latencies_s.extend(part.latencies_s)
            merged.window_s = max(merged.window_s, part.window_s)
            merged.errors += part.errors
            merged.warmup_errors += part.warmup_errors
            merged.warmup_requests += part.warmup_requests
            merged.error_samples.extend(part.error_samples[: MAX_ERROR_SAMPLES - len(merged.error_samples)])
        return merged

    def stream(self, targets: list[Target], prompt: str, max_tokens: int, warmup: int, requests: int) -> StreamResult:
        _, conn = self._workers[0]
        conn.send(
            {
                "op": "stream",
                "targets": targets,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "warmup": warmup,
                "requests": requests,
            }
        )
        return self._collect([conn])[0]

    def close(self) -> None:
        for _process, conn in self._workers:
            try:
                conn.send({"op": "stop"})
            except (OSError, ValueError):
                pass
        for process, conn in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers.clear()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
