"""Gateway client used by the CLI (and a readable example of calling the public API)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np

from services.common.api import gateway_pb2_grpc
from services.common.settings import STATE_DIR

DEV_KEY_FILE = STATE_DIR / "dev-api-key"
DEFAULT_GATEWAY = "127.0.0.1:50051"

# numpy dtype <-> KServe v2 dtype names (tensors travel as raw little-endian bytes)
NUMPY_TO_DTYPE = {
    np.dtype("bool"): "BOOL",
    np.dtype("uint8"): "UINT8",
    np.dtype("int8"): "INT8",
    np.dtype("int16"): "INT16",
    np.dtype("int32"): "INT32",
    np.dtype("int64"): "INT64",
    np.dtype("float16"): "FP16",
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
}
DTYPE_TO_NUMPY = {v: k for k, v in NUMPY_TO_DTYPE.items()}


def resolve_api_key(explicit: str | None, key_file: Path = DEV_KEY_FILE) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("MLMESH_API_KEY"):
        return os.environ["MLMESH_API_KEY"]
    if key_file.exists():
        return key_file.read_text().strip()
    return None


def auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def gateway_stub(address: str) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayStub]:
    channel = grpc.insecure_channel(address)
    return channel, gateway_pb2_grpc.GatewayStub(channel)


def tensor_to_numpy(dtype: str, shape: list[int] | tuple[int, ...], raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=DTYPE_TO_NUMPY[dtype].newbyteorder("<")).reshape(shape)
