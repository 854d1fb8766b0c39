"""`mlmesh up`: prepare models, start Triton, host registry + router + gateway, serve until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.status import Status
from rich.table import Table

from services.cli.client import DEV_KEY_FILE
from services.common.kafka import KafkaSettings, ensure_topics
from services.common.net import free_port
from services.common.server import wait_for_shutdown_signal
from services.common.settings import REPO_ROOT, STATE_DIR, load_yaml
from services.common.tansu import TansuBroker
from services.common.telemetry import setup_logging
from services.common.triton_server import TritonServer
from services.gateway.keys import KeyStore
from services.gateway.settings import GatewaySettings
from services.mesh import Mesh, freeze_startup_heap, start_mesh
from services.registry.bootstrap import SeedModel, seed
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings

console = Console()


class UpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_UP_", extra="forbid")

    llm: Literal["smollm2", "tiny"] = "smollm2"
    model_repository: Path = REPO_ROOT / "model_repository"
    triton_grpc_port: int = 0  # 0 -> pick a free port
    triton_http_port: int = 0
    triton_metrics_port: int = 0
    kafka_port: int = 9092  # the embedded Tansu broker (memory storage)
    logger_port: int = 50053
    drift_port: int = 50055  # hosted in the logger's process: both use the embedded ClickHouse


def _ensure_dev_key(store: KeyStore) -> str:
    """A key for the local 'dev' tenant, written where the CLI finds it."""
    if DEV_KEY_FILE.exists():
        key = DEV_KEY_FILE.read_text().strip()
        if store.lookup(key) is not None:
            return key
    issued = store.create("dev", GatewaySettings().default_limits)
    DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEV_KEY_FILE.write_text(issued.api_key + "\n")
    DEV_KEY_FILE.chmod(0o600)
    return issued.api_key


def _prepare_models(up: UpSettings, status: Status) -> Path:
    from services.common.model_build.llm import build_tiny_llm, prepare_smollm2
    from services.common.model_build.tabular import build_tabular

    def progress(prefix: str) -> Callable[[str], None]:
        return lambda line: status.update(f"[bold]{prefix}[/bold] {line}")

    started = time.perf_counter()
    build_tabular(progress=progress("tabular classifier:"))
    console.print(f"[green]✓[/green] tabular classifier (ONNX) ready ({time.perf_counter() - started:.1f}s)")
    started = time.perf_counter()
    if up.llm == "smollm2":
        llm_dir = prepare_smollm2(progress=progress("SmolLM2-135M-Instruct:"))
    else:
        llm_dir = build_tiny_llm(progress=progress("tiny LLM:"))
    console.print(f"[green]✓[/green] LLM weights ready: {llm_dir} ({time.perf_counter() - started:.1f}s)")
    return llm_dir


def run_up(config_path: Path | None = None, llm: str | None = None) -> int:
    config = load_yaml(config_path)
    up = UpSettings(**{**config.get("up", {}), **({"llm": llm} if llm else {})})
    gateway_settings = GatewaySettings(**config.get("gateway", {}))
    setup_logging(os.environ.get("MLMESH_LOG_LEVEL", "WARNING"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    triton: TritonServer | None = None
    broker: TansuBroker | None = None
    logger_process: subprocess.Popen[bytes] | None = None
    try:
        with console.status("[bold]preparing models[/bold]") as status:
            llm_dir = _prepare_models(up, status)
            status.update("[bold]starting the Kafka broker (Tansu)[/bold]")
            broker = TansuBroker(up.kafka_port)
            broker.start()
            broker.wait_ready()
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
            ensure_topics(kafka)
            console.print(f"[green]✓[/green] Kafka broker (Tansu) on {broker.bootstrap}")
            status.update("[bold]starting the logger (Kafka → ClickHouse)[/bold]")
            logger_process = _start_logger(up, broker.bootstrap)
            status.update("[bold]starting Triton[/bold]")
            triton = TritonServer(
                up.model_repository,
                up.triton_grpc_port or free_port(),
                up.triton_http_port or free_port(),
                up.triton_metrics_port or free_port(),
            )
            triton.start()
            triton.wait_ready(120)
            console.print(f"[green]✓[/green] Triton ready on {triton.grpc_url} (log: {triton.log_path})")
            api_key = _ensure_dev_key(KeyStore(gateway_settings.keys_db))
            status.update("[bold]waiting for the logger[/bold]")
            _wait_healthy(f"127.0.0.1:{up.logger_port}", logger_process, 60)
            console.print(f"[green]✓[/green] logger on 127.0.0.1:{up.logger_port} (ClickHouse: embedded chdb)")
        gateway_settings.events = gateway_settings.events.model_copy(update={"enabled": True, "kafka": kafka})
        router_settings = RouterSettings(**{**config.get("router", {}), "triton_url": triton.grpc_url})
        registry_settings = RegistrySettings(
            **{"analysis_address": f"127.0.0.1:{up.drift_port}", **config.get("registry", {}),
               "triton_url": triton.grpc_url}
        )
        seeds = [
            SeedModel("tabular-classifier", "tabular", up.model_repository / "tabular_classifier",
                      description="breast-cancer classifier (scikit-learn -> ONNX)"),
            SeedModel("llm", "llm", up.model_repository / "llm", {"model_dir": str(llm_dir)},
                      description=f"causal LM from {llm_dir.name}"),
        ]
        asyncio.run(_serve(gateway_settings, router_settings, registry_settings, seeds, triton, api_key, up))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        console.print(f"[red]error[/red] {exc}")
        return 1
    finally:
        if logger_process is not None and logger_process.poll() is None:
            console.print("stopping the logger ...")
            logger_process.send_signal(signal.SIGTERM)
            try:
                logger_process.wait(30)
            except subprocess.TimeoutExpired:
                logger_process.kill()
        if triton is not None:
            console.print("stopping Triton ...")
            triton.stop()
        if broker is not None:
            broker.stop()
    console.print("mlmesh stopped.")
    return 0


def _start_logger(up: UpSettings, bootstrap: str) -> subprocess.Popen[bytes]:
    """The logger owns the embedded ClickHouse directory (chdb allows one process per path), so
    the analysis (drift) service is hosted in the same process."""
    log_path = STATE_DIR / "logs" / "logger.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLMESH_SERVICES": "logger,drift",
        "MLMESH_LOGGER_PORT": str(up.logger_port),
        "MLMESH_DRIFT_PORT": str(up.drift_port),
        "MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.mesh"], env=env, stdout=log, stderr=log, start_new_session=True
        )


def _wait_healthy(address: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OSError(f"logger exited with code {process.returncode}; see {STATE_DIR / 'logs' / 'logger.log'}")
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise OSError(f"logger not healthy on {address} after {timeout_s:.0f}s")


async def _serve(
    gateway_settings: GatewaySettings,
    router_settings: RouterSettings,
    registry_settings: RegistrySettings,
    seeds: list[SeedModel],
    triton: TritonServer,
    api_key: str,
    up: UpSettings,
) -> None:
    try:
        mesh = await start_mesh({"registry", "gateway", "router"}, gateway_settings, router_settings,
                                registry_settings)
    except RuntimeError as exc:
        raise OSError(f"{exc} (is another mlmesh already running?)") from exc
    try:
        await _seed_models(mesh, seeds)
        freeze_startup_heap()
    except BaseException:
        await mesh.stop()
        raise
    table = Table(title="mlmesh is up", show_header=True)
    table.add_column("service")
    table.add_column("listens on")
    table.add_row("gateway (public API)", mesh.address("gateway").replace("127.0.0.1", gateway_settings.host))
    table.add_row("router (internal)", mesh.address("router"))
    table.add_row("registry (versions, rollouts)", mesh.address("registry"))
    table.add_row("triton gRPC / HTTP", f"{triton.grpc_url} / {triton.http_url}")
    table.add_row("logger (events → ClickHouse)", f"127.0.0.1:{up.logger_port}")
    table.add_row("drift (drift, A/B analysis)", f"127.0.0.1:{up.drift_port}")
    table.add_row("Kafka (Tansu)", gateway_settings.events.kafka.bootstrap_servers)
    console.print(table)
    console.print(f"dev API key (tenant 'dev'): [bold]{api_key}[/bold]  (saved in {DEV_KEY_FILE})")
    console.print("try, in another terminal:")
    console.print("  .venv/bin/mlmesh predict --sample 3")
    console.print('  .venv/bin/mlmesh generate "What is the capital of France?"')
    console.print("  .venv/bin/mlmesh feedback <prediction id> --label 1")
    console.print("  .venv/bin/mlmesh query")
    console.print("  .venv/bin/mlmesh models list        (registry: versions, stages; see README for rollouts)")
    console.print("serving until Ctrl-C")
    try:
        await wait_for_shutdown_signal()
        console.print("shutting down: draining in-flight requests ...")
    finally:
        await mesh.stop()


async def _seed_models(mesh: Mesh, seeds: list[SeedModel]) -> None:
    """Demo models go through the registry like any version: registered, promoted, audited."""
    assert mesh.registry is not None and mesh.router is not None
    registry = mesh.registry.registry
    for model in seeds:
        started = time.perf_counter()
        with console.status(f"[bold]{model.name}[/bold]: checking the registry") as status:

            def progress(phase: str, message: str, status: Status = status, name: str = model.name) -> None:
                status.update(f"[bold]{name}[/bold] {phase}: {message}")

            version = await seed(registry, model, progress)
        console.print(
            f"[green]✓[/green] {model.name} v{version} in production ({time.perf_counter() - started:.1f}s)"
        )
    # The co-hosted router serves once it has applied the registry's table with both models.
    names = {m.name for m in seeds}
    for _ in range(300):
        if names <= {route.model for route in mesh.router.table.routes}:
            return
        await asyncio.sleep(0.1)
    raise OSError("the router did not receive the registry's routing table within 30 s")
