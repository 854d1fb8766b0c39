"""Starts the real servers the benchmark measures, on free loopback ports, and stops them all.

- Triton (the real binary, services.common.triton_server) with tabular_classifier and llm loaded;
- the mesh (gateway + router) in its own interpreter (`python -m bench.mesh_entry`), so the
  benchmark client never shares a GIL with it;
- MLServer 1.7.1 from .venv-mlserver, serving the same ONNX file through bench/mlserver_model;
- optionally (target `gateway+events`) a real Tansu broker and a SECOND mesh process, identical
  to the first but with the gateway's prediction events enabled against that broker.

Every process is registered for cleanup the moment it exists: Stack.close() (also reached on
Ctrl-C, SIGTERM and errors) stops the mesh with SIGTERM, Triton with .stop(), MLServer with
SIGTERM then SIGKILL. Child processes run in their own session, so a Ctrl-C in the terminal
reaches only the harness, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.api import gateway_pb2, gateway_pb2_grpc
from services.common.net import free_port
from services.common.processes import log_tail, signal_group

REPO_ROOT = Path(__file__).resolve().parents[1]
MLSERVER_VENV = REPO_ROOT / ".venv-mlserver"
MLSERVER_MODEL_DIR = REPO_ROOT / "bench" / "mlserver_model"
MLSERVER_MODEL_NAME = "tabular_classifier"
TRITON_TABULAR = "tabular_classifier"
TRITON_LLM = "llm"
PUBLIC_TABULAR = "tabular-classifier"
PUBLIC_LLM = "llm"

Progress = Callable[[str], None]




def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM`: the child also gets SIGTERM if the harness is SIGKILLed."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def stop_process(process: subprocess.Popen[bytes], term_timeout_s: float) -> int | None:
    """SIGTERM to the child's process group, wait, then SIGKILL whatever is left."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=term_timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (e.g. MLServer workers): kill the rest unconditionally.
    signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    return process.returncode


@dataclass
class Stack:
    workdir: Path
    progress: Progress
    llm: str = "tiny"
    triton_grpc: str = ""
    gateway: str = ""
    router: str = ""
    mlserver: str = ""
    api_key: str = ""
    triton_version: str = ""
    llm_dir: str = ""
    mesh_pid: int | None = None
    mlserver_pid: int | None = None
    proxy: str = ""
    proxy_pid: int | None = None
    mesh_profile_path: Path | None = None
    events_gateway: str = ""
    events_router: str = ""
    events_mesh_pid: int | None = None
    kafka_bootstrap: str = ""
    tansu_pid: int | None = None
    _closers: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    _triton: object | None = None

    # -- lifecycle --

    def close(self) -> None:
        """Stops everything that was started, newest first; never raises."""
        while self._closers:
            name, closer = self._closers.pop()
            started = time.monotonic()
            try:
                closer()
            except Exception as error:  # keep stopping the others
                self.progress(f"warning: stopping {name} failed: {error!r}")
            self.progress(f"stopped {name} in {time.monotonic() - started:.1f} s")

    def start(
        self,
        with_mlserver: bool = True,
        with_proxy: bool = False,
        mesh_cprofile: Path | None = None,
        with_events: bool = False,
    ) -> None:
        from services.common.model_build.llm import build_tiny_llm, prepare_smollm2
        from services.common.model_build.tabular import build_tabular

        self.progress("building model artifacts (idempotent)")
        onnx = build_tabular(progress=self.progress)
        llm_dir = (
            prepare_smollm2(progress=self.progress) if self.llm == "smollm2" else build_tiny_llm(progress=self.progress)
        )
        self.llm_dir = str(llm_dir)

        # MLServer first: it starts in the background while Triton boots.
        mlserver_process = self._spawn_mlserver(onnx) if with_mlserver else None
        self._start_triton()
        self._start_mesh(mesh_cprofile)
        if with_events:
            self._start_events_mesh()
        if with_proxy:
            self._start_proxy()
        if mlserver_process is not None:
            self._wait_mlserver(mlserver_process)

    # -- Triton --

    def _start_triton(self) -> None:
        from services.common.triton_server import TritonServer, load_model_sync

        triton = TritonServer(
            model_repository=REPO_ROOT / "model_repository",
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            log_path=self.workdir / "triton.log",
        )
        self._closers.append(("triton", triton.stop))
        self._triton = triton
        self.progress(f"starting Triton on {triton.grpc_url}")
        triton.start()
        triton.wait_ready(120)
        self.triton_grpc = triton.grpc_url
        self.progress("loading tabular_classifier and llm into Triton")
        load_model_sync(self.triton_grpc, TRITON_TABULAR)
        load_model_sync(self.triton_grpc, TRITON_LLM, {"model_dir": self.llm_dir})
        with grpc.insecure_channel(self.triton_grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            self.triton_version = stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=5).version

    @property
    def triton_pid(self) -> int | None:
        return getattr(self._triton, "pid", None)

    # -- mesh --

    def _create_api_key(self, keys_db: Path) -> str:
        from services.gateway.keys import KeyStore
        from services.gateway.settings import TenantLimits

        limits = TenantLimits(requests_per_s=1e6, burst=1_000_000, tokens_per_min=100_000_000)
        return KeyStore(keys_db).create("bench", limits).api_key

    def _start_mesh(self, cprofile_path: Path | None) -> None:
        self.api_key = self._create_api_key(self.workdir / "keys.db")
        env: dict[str, str] = {}
        if cprofile_path is not None:
            env["MLMESH_BENCH_CPROFILE"] = str(cprofile_path)
            self.mesh_profile_path = cprofile_path
        self.mesh_pid, self.gateway, self.router = self._spawn_mesh("mesh", env)

    def _start_events_mesh(self) -> None:
        """A Tansu broker with the topics, then the same mesh again with event emission on."""
        from services.common.kafka import KafkaSettings, ensure_topics
        from services.common.tansu import TansuBroker

        broker = TansuBroker(free_port(), log_path=self.workdir / "tansu.log")
        # Registered before the second mesh: stopped after it, so its emitter can flush on SIGTERM.
        self._closers.append(("tansu", broker.stop))
        self.progress(f"starting Tansu on {broker.bootstrap}")
        broker.start()
        broker.wait_ready()
        self.tansu_pid, self.kafka_bootstrap = broker.pid, broker.bootstrap
        ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap))
        env = {
            "MLMESH_GATEWAY_EVENTS__ENABLED": "true",
            "MLMESH_GATEWAY_EVENTS__KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "MLMESH_GATEWAY_EVENTS__SPOOL_DIR": str(self.workdir / "spool"),
        }
        self.events_mesh_pid, self.events_gateway, self.events_router = self._spawn_mesh("mesh-events", env)

    def _spawn_mesh(self, name: str, extra_env: dict[str, str]) -> tuple[int, str, str]:
        """Starts `python -m bench.mesh_entry` (gateway + router) and waits until it serves.

        Returns (pid, gateway address, router address). Every mesh shares keys.db and Triton."""
        gateway_port, router_port = free_port(), free_port()
        env = dict(os.environ)
        env.update(
            {
                "MLMESH_SERVICES": "gateway,router",
                "MLMESH_GATEWAY_PORT": str(gateway_port),
                "MLMESH_ROUTER_PORT": str(router_port),
                "MLMESH_ROUTER_TRITON_URL": self.triton_grpc,
                "MLMESH_GATEWAY_KEYS_DB": str(self.workdir / "keys.db"),
                "MLMESH_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
                **extra_env,
            }
        )
        log_path = self.workdir / f"{name}.log"
        self.progress(f"starting {name} (gateway :{gateway_port}, router :{router_port})")
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [*_pdeathsig_prefix(), sys.executable, "-m", "bench.mesh_entry"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The gateway drains for its grace period (10 s) on SIGTERM; allow for that.
        self._closers.append((name, lambda: self._stop_mesh(process, log_path)))
        gateway, router = f"127.0.0.1:{gateway_port}", f"127.0.0.1:{router_port}"
        self._wait_mesh(process, log_path, gateway, router)
        return process.pid, gateway, router

    def _stop_mesh(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        code = stop_process(process, term_timeout_s=20)
        if code not in (0, -signal.SIGTERM):
            self.progress(f"warning: {log_path.stem} exited with code {code}; log: {log_path}")

    def _wait_mesh(
        self, process: subprocess.Popen[bytes], log_path: Path, gateway: str, router: str, timeout_s: float = 90.0
    ) -> None:
        deadline = time.monotonic() + timeout_s

        def check_alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"{log_path.stem} exited with code {process.returncode}:\n{log_tail(log_path)}")

        for address in (router, gateway):
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    check_alive()
                    try:
                        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the mesh at {address} was not SERVING in {timeout_s:.0f} s")
                    time.sleep(0.1)
        # SERVING is not enough: wait until the gateway lists both models as ready.
        with grpc.insecure_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            metadata = (("authorization", f"Bearer {self.api_key}"),)
            ready: dict[str, bool] = {}
            while True:
                check_alive()
                try:
                    reply = stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
                    ready = {m.name: m.ready for m in reply.models}
                    if ready.get(PUBLIC_TABULAR) and ready.get(PUBLIC_LLM):
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not list both models as ready (last: {ready})")
                time.sleep(0.2)

    # -- baseline proxy (bench/baseline_proxy.py) --

    def _start_proxy(self, timeout_s: float = 30.0) -> None:
        port = free_port()
        log_path = self.workdir / "proxy.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    *_pdeathsig_prefix(),
                    sys.executable,
                    "-m",
                    "bench.baseline_proxy",
                    *("--port", str(port)),
                    *("--upstream", self.triton_grpc),
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._closers.append(("proxy", lambda: stop_process(process, term_timeout_s=5)))
        self.proxy, self.proxy_pid = f"127.0.0.1:{port}", process.pid
        with grpc.insecure_channel(self.proxy) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
            except grpc.FutureTimeoutError:
                raise RuntimeError(
                    f"the baseline proxy did not listen in {timeout_s:.0f} s:\n{log_tail(log_path)}"
                ) from None

    def signal_mesh(self, signum: signal.Signals) -> None:
        if self.mesh_pid is not None:
            os.kill(self.mesh_pid, signum)

    # -- MLServer --

    def _spawn_mlserver(self, onnx_path: Path) -> subprocess.Popen[bytes]:
        mlserver_bin = MLSERVER_VENV / "bin" / "mlserver"
        if not mlserver_bin.is_file():
            self.progress("creating .venv-mlserver (bench/setup_mlserver.sh)")
            subprocess.run(["bash", str(REPO_ROOT / "bench" / "setup_mlserver.sh")], check=True)
        root = self.workdir / "mlserver"
        (root / MLSERVER_MODEL_NAME).mkdir(parents=True, exist_ok=True)
        grpc_port, http_port = free_port(), free_port()
        settings = {
            "debug": False,
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            # In-process inference: the default worker pool is ~2.5x slower for a model this small.
            "parallel_workers": 0,
            "metrics_endpoint": None,
            "load_models_at_startup": True,
        }
        (root / "settings.json").write_text(json.dumps(settings, indent=2))
        model_settings = json.loads((MLSERVER_MODEL_DIR / "model-settings.json").read_text())
        model_settings["parameters"]["uri"] = str(onnx_path.resolve())
        (root / MLSERVER_MODEL_NAME / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        env = dict(os.environ)
        # The runtime module comes from bench/mlserver_model; nothing of the mesh's venv leaks in.
        env["PYTHONPATH"] = str(MLSERVER_MODEL_DIR)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = os.pathsep.join((str(MLSERVER_VENV / "bin"), env.get("PATH", "")))
        log_path = self.workdir / "mlserver.log"
        self.progress(f"starting MLServer on 127.0.0.1:{grpc_port}")
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [*_pdeathsig_prefix(), str(mlserver_bin), "start", str(root)],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._closers.append(("mlserver", lambda: stop_process(process, term_timeout_s=10)))
        self.mlserver = f"127.0.0.1:{grpc_port}"
        self.mlserver_pid = process.pid
        return process

    def _wait_mlserver(self, process: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
        log_path = self.workdir / "mlserver.log"
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.mlserver) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"MLServer exited with code {process.returncode}:\n{log_tail(log_path)}")
                try:
                    request = service_pb2.ModelReadyRequest(name=MLSERVER_MODEL_NAME)
                    if stub.ModelReady(request, timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"MLServer was not ready in {timeout_s:.0f} s:\n{log_tail(log_path)}")
                time.sleep(0.2)
