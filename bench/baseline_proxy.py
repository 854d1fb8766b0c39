"""The cheapest possible Python gRPC hop, as a yardstick for the mesh (opt-in target `proxy`).

A grpc.aio server that forwards KServe v2 ModelInfer calls to Triton as opaque bytes: no
protobuf parsing, no auth, no tracing, one persistent upstream channel. Whatever the router or
gateway cost beyond this is the mesh's own code; what this costs is the price of any Python
aio hop on this machine. Run: python -m bench.baseline_proxy --port P --upstream HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def serve(port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    forward = channel.unary_unary(METHOD)  # no (de)serializers: bytes in, bytes out

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await forward(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
            raise  # unreachable: abort raises

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
