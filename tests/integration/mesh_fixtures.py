"""Mesh fixtures: the gateway + router as a real subprocess in front of the session's Triton."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.triton_server import TritonServer
from services.gateway.keys import KeyStore
from services.gateway.settings import TenantLimits
from tests.integration._mesh import MeshEndpoint, MeshProcess

GENEROUS_LIMITS = TenantLimits(requests_per_s=10_000, burst=20_000, tokens_per_min=10_000_000)


@pytest.fixture(scope="session")
def mesh_endpoint(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshEndpoint]:
    workdir = tmp_path_factory.mktemp("mesh")
    keys_db = workdir / "keys.db"
    api_key = KeyStore(keys_db).create("e2e", GENEROUS_LIMITS).api_key
    mesh = MeshProcess("gateway,router", triton.grpc_url, keys_db, workdir / "mesh.log")
    mesh.start()
    try:
        mesh.wait_serving(api_key, models=("tabular-classifier", "llm"))
        yield MeshEndpoint(mesh.gateway, mesh.router, api_key, keys_db)
    finally:
        exit_code = mesh.stop()
    assert exit_code == 0, f"mesh did not shut down cleanly:\n{mesh.log_tail()}"
