"""Typed settings shared by every service. Each service subclasses ServerSettings with its prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = REPO_ROOT / ".mlmesh"
CACHE_DIR = REPO_ROOT / ".cache"


class TelemetrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_OTEL_", extra="forbid")

    # "none" keeps spans in-process (trace ids still flow); "console" prints them; "otlp" exports.
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    sample_ratio: float = 1.0
    service_namespace: str = "mlmesh"


class ServerSettings(BaseSettings):
    """What every gRPC service needs to listen and shut down well."""

    model_config = SettingsConfigDict(env_prefix="MLMESH_", extra="forbid", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = 0  # 0 -> an ephemeral port chosen by the OS
    grace_period_s: float = 10.0
    max_message_bytes: int = 8 * 1024 * 1024
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"


def load_yaml(path: Path | None) -> dict[str, Any]:
    """Reads the single YAML file `mlmesh up --config` accepts (sections per service)."""
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (gateway, router, triton, ...)")
    return data
