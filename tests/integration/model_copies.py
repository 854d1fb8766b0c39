"""Copies of tabular_classifier loaded into a running Triton under other names (with faults)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping

from tritonclient.grpc import InferenceServerClient

from services.common.triton_server import DEFAULT_MODEL_REPOSITORY, model_config_json


def load_copy(grpc_url: str, name: str, parameters: Mapping[str, str]) -> None:
    """Loads tabular_classifier's files under another Triton name (config and files sent inline)."""
    config = json.loads(model_config_json("tabular_classifier", dict(parameters)))
    config["name"] = name
    version_dir = DEFAULT_MODEL_REPOSITORY / "tabular_classifier" / "1"
    files = {f"file:1/{f}": (version_dir / f).read_bytes() for f in ("model.py", "model.onnx")}
    client = InferenceServerClient(grpc_url)
    try:
        client.load_model(name, config=json.dumps(config), files=files)
    finally:
        client.close()


def unload(grpc_url: str, name: str) -> None:
    client = InferenceServerClient(grpc_url)
    try:
        client.unload_model(name)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def loaded_copies(grpc_url: str, copies: Mapping[str, Mapping[str, str]]) -> AsyncIterator[None]:
    """{name: config parameters}: loaded on entry, unloaded on exit."""
    await asyncio.gather(*(asyncio.to_thread(load_copy, grpc_url, n, p) for n, p in copies.items()))
    try:
        yield
    finally:
        await asyncio.gather(*(asyncio.to_thread(unload, grpc_url, name) for name in copies))
