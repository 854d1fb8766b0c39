"""Session fixtures for integration tests: real model artifacts and a real tritonserver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tritonclient.grpc.aio import InferenceServerClient

from services.common.model_build.llm import build_tiny_llm
from services.common.model_build.tabular import REPO_ROOT, build_tabular
from services.common.triton_server import TritonServer, load_model

MODEL_REPOSITORY = REPO_ROOT / "model_repository"
TRITON_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BuiltModels:
    tabular_onnx: Path
    tiny_llm_dir: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def built_models() -> BuiltModels:
    """Builds the tabular ONNX and the tiny LLM once; later sessions reuse them."""
    return BuiltModels(tabular_onnx=build_tabular(REPO_ROOT), tiny_llm_dir=build_tiny_llm())


@pytest.fixture(scope="session")
async def triton(built_models: BuiltModels, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServer]:
    """A real tritonserver serving `tabular_classifier` and `llm` (the tiny LLM)."""
    server = TritonServer(
        MODEL_REPOSITORY,
        grpc_port=_free_port(),
        http_port=_free_port(),
        metrics_port=_free_port(),
        log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log",
    )
    try:
        server.start()
        await asyncio.to_thread(server.wait_ready, TRITON_READY_TIMEOUT_S)
        await load_model(server.grpc_url, "tabular_classifier")
        await load_model(server.grpc_url, "llm", {"model_dir": str(built_models.tiny_llm_dir)})
    except Exception as error:
        server.stop()
        pytest.fail(f"could not start Triton (log: {server.log_path}): {error}\n{server.log_tail()}")
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def triton_client(triton: TritonServer) -> AsyncIterator[InferenceServerClient]:
    client = InferenceServerClient(triton.grpc_url)
    yield client
    await client.close()


# Mesh fixtures live in their own module; importing them here registers them for this folder.
from tests.integration.kafka_fixtures import kafka_broker  # noqa: E402, F401
from tests.integration.mesh_fixtures import mesh_endpoint  # noqa: E402, F401
