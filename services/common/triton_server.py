"""Runs the real Triton Inference Server binary shipped in the nvidia-pytriton wheel.

The wheel is only the source of the binary: we run `tritonserver` directly (PyTriton's own
launcher hides the model-repository API and adds latency). See RUNBOOK-REAL-COMPONENTS.md.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import InferenceServerClient, model_config_pb2
from tritonclient.utils import InferenceServerException

from services.common.processes import log_tail, signal_group

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "triton"
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# Loading a python-backend model that imports torch takes several seconds; a big LLM longer.
DEFAULT_LOAD_TIMEOUT_S = 600.0
_SHM_DIR = Path("/dev/shm")


class TritonServerError(RuntimeError):
    """The tritonserver process failed to start, died, or never became ready."""


class ModelLoadError(RuntimeError):
    """Triton refused to load a model; the message carries Triton's reason."""


def _pytriton_server_dir() -> Path:
    # find_spec locates the package without importing PyTriton itself (we only want its files).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("nvidia-pytriton is not installed: it provides the tritonserver binary")
    server_dir = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"no tritonserver binary under {server_dir}")
    return server_dir


def _copy_if_changed(source: Path, target: Path) -> None:
    stat = source.stat()
    if target.exists():
        existing = target.stat()
        if existing.st_size == stat.st_size and int(existing.st_mtime) == int(stat.st_mtime):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy to a private name then rename, so a concurrent launcher never sees a half-written file.
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def prepare_runtime(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Lays out bin/, backends/ and caches/ under cache_dir/runtime (idempotent); returns that dir.

    The wheel keeps the python backend stub for each Python version apart from the backend; the
    backend looks for it next to libtriton_python.so, so the runtime dir joins the two.
    """
    server_dir = _pytriton_server_dir()
    runtime_dir = cache_dir / "runtime"
    stub_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / stub_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"the wheel has no python backend stub for Python {stub_version}")
    for subdir in ("bin", "backends", "caches"):
        for source in (server_dir / subdir).rglob("*"):
            if source.is_file() and "__pycache__" not in source.parts:
                _copy_if_changed(source, runtime_dir / source.relative_to(server_dir))
    _copy_if_changed(stub, runtime_dir / "backends" / "python" / stub.name)
    return runtime_dir


def server_environment(extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment the binary and its python stubs need (see the runbook for why each part)."""
    server_dir = _pytriton_server_dir()
    bundled_libs = server_dir.parent.parent / "nvidia_pytriton.libs"
    # Without LIBDIR the stub links the system libpython against this interpreter's stdlib.
    python_libdir = sysconfig.get_config_var("LIBDIR")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (str(bundled_libs), python_libdir, env.get("LD_LIBRARY_PATH")) if part
    )
    # PATH decides which environment the python stub imports packages from: ours.
    env["PATH"] = os.pathsep.join(part for part in (str(Path(sys.prefix) / "bin"), env.get("PATH")) if part)
    env.update(extra_env or {})
    return env




class TritonServer:
    """One tritonserver process in explicit model-control mode, bound to loopback ports."""

    def __init__(
        self,
        model_repository: Path,
        grpc_port: int,
        http_port: int,
        metrics_port: int,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        extra_env: dict[str, str] | None = None,
        cache_dir: Path = DEFAULT_CACHE_DIR,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.host = host
        self.cache_dir = cache_dir
        self.log_path = log_path or cache_dir / "logs" / f"tritonserver-{grpc_port}.log"
        self.extra_env = dict(extra_env or {})
        # A prefix of our own names this server's python-backend shared memory, so that
        # stop()/kill() can remove what a killed server leaves behind in /dev/shm.
        self._shm_prefix = f"mlmesh_triton_{uuid.uuid4().hex[:12]}_"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self, runtime_dir: Path) -> list[str]:
        return [
            str(runtime_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={runtime_dir / 'backends'}",
            f"--cache-directory={runtime_dir / 'caches'}",
            "--model-control-mode=explicit",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--log-info=true",
        ]

    def start(self) -> None:
        if self.is_running:
            raise TritonServerError(f"tritonserver is already running (pid {self.pid})")
        runtime_dir = prepare_runtime(self.cache_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            # Own session = own process group, so stop() reaches the python stubs too.
            self._process = subprocess.Popen(
                self._command(runtime_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=server_environment(self.extra_env),
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Polls /v2/health/ready; raises with the log tail if the process exits or time runs out."""
        if self._process is None:
            raise TritonServerError("tritonserver was not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {exit_code} before it was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(0.1)
        raise TritonServerError(
            f"tritonserver was not ready after {timeout_s:.0f} s; log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton drains and unloads models), then SIGKILL of the whole group."""
        if self._process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and its python stubs at once (used by chaos tests)."""
        if self._process is None:
            return
        self._signal_group(signal.SIGKILL)
        self._process.wait()
        self._remove_shared_memory()

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._process is not None
        signal_group(self._process, signum)

    def _remove_shared_memory(self) -> None:
        for region in _SHM_DIR.glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def log_tail(self) -> str:
        return log_tail(self.log_path)


def model_config_json(
    name: str,
    parameters: Mapping[str, str],
    model_repository: Path = DEFAULT_MODEL_REPOSITORY,
) -> str:
    """The model's config.pbtxt with its string parameters set/overridden, as Triton's JSON."""
    config_path = Path(model_repository) / name / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    config.name = name
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))


async def load_model(
    grpc_url: str,
    name: str,
    parameters: Mapping[str, str] | None = None,
    *,
    model_repository: Path = DEFAULT_MODEL_REPOSITORY,
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """load_model_sync, run off the event loop (loading takes seconds)."""
    await asyncio.to_thread(
        load_model_sync, grpc_url, name, parameters, model_repository=model_repository, timeout_s=timeout_s
    )


def load_model_sync(
    grpc_url: str,
    name: str,
    parameters: Mapping[str, str] | None = None,
    *,
    model_repository: Path = DEFAULT_MODEL_REPOSITORY,
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """Loads (or reloads) `name`; with `parameters`, overrides its config.pbtxt parameters."""
    config = None if parameters is None else model_config_json(name, parameters, model_repository)
    client = InferenceServerClient(grpc_url)
    try:
        client.load_model(name, config=config, client_timeout=timeout_s)
    except InferenceServerException as error:
        raise ModelLoadError(f"Triton at {grpc_url} could not load model {name!r}: {error.message()}") from error
    finally:
        client.close()
