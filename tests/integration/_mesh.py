"""Runs the mesh as a real subprocess (`python -m services.mesh`), as a deployment would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api import gateway_pb2, gateway_pb2_grpc
from services.common.net import free_port
from services.common.settings import REPO_ROOT


@dataclass
class MeshEndpoint:
    gateway: str
    router: str
    api_key: str
    keys_db: Path


class MeshProcess:
    def __init__(self, services: str, triton_url: str, keys_db: Path, log_path: Path, **env: str) -> None:
        self.gateway_port = free_port()
        self.router_port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "MLMESH_SERVICES": services,
            "MLMESH_GATEWAY_PORT": str(self.gateway_port),
            "MLMESH_ROUTER_PORT": str(self.router_port),
            "MLMESH_ROUTER_TRITON_URL": triton_url,
            "MLMESH_GATEWAY_KEYS_DB": str(keys_db),
            "MLMESH_LOG_LEVEL": "INFO",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def router(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.mesh"], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log
        )

    def wait_serving(self, api_key: str, timeout_s: float = 60.0, models: tuple[str, ...] = ()) -> None:
        """Until health says SERVING and (if given) the gateway lists these models as ready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"mesh exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with grpc.insecure_channel(self.gateway) as channel:
                    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if health.status == health_pb2.HealthCheckResponse.SERVING:
                        listed = gateway_pb2_grpc.GatewayStub(channel).ListModels(
                            gateway_pb2.ListModelsRequest(),
                            metadata=[("authorization", f"Bearer {api_key}")],
                            timeout=2,
                        )
                        ready = {m.name for m in listed.models if m.ready and m.inputs}
                        if set(models) <= ready:
                            return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"mesh not serving after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful drain) and the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""
