from __future__ import annotations

from pydantic import BaseModel
from pydantic_settings import SettingsConfigDict

from services.common.settings import STATE_DIR, ServerSettings


class RolloutDefaults(BaseModel):
    steps: list[float] = [0.01, 0.05, 0.25, 0.5, 1.0]
    step_duration_s: float = 60.0
    min_requests_per_step: int = 100
    max_error_rate: float = 0.05
    max_latency_p95_ms: float = 0.0  # 0 = off
    max_latency_ratio: float = 3.0  # canary p95 / stable p95; 0 = off
    analysis_interval_s: float = 1.0


class SeedSpec(BaseModel):
    """A model directory the registry puts in production at start (if it is not already)."""

    name: str
    kind: str
    directory: str
    parameters: dict[str, str] = {}
    description: str = ""


class RegistrySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_REGISTRY_", extra="forbid", env_nested_delimiter="__")

    port: int = 50054
    # SQLite file by default; a postgresql:// DSN for a shared, durable store.
    database_url: str = f"sqlite:///{STATE_DIR / 'registry.db'}"
    artifact_dir: str = str(STATE_DIR / "artifacts")
    triton_url: str = "127.0.0.1:8001"
    load_timeout_s: float = 600.0
    warmup_requests: int = 3
    # How long a swap waits for every router to serve the new table, then for in-flight
    # requests on the old version to finish, before unloading it.
    route_apply_timeout_s: float = 15.0
    drain_timeout_s: float = 30.0
    # Pushed models vanish when Triton restarts: the registry checks and reloads them.
    reconcile_interval_s: float = 5.0
    # Registration payloads carry whole model directories.
    max_message_bytes: int = 512 * 1024 * 1024
    rollout: RolloutDefaults = RolloutDefaults()
    # The analysis (Drift) service: with it, each canary step is also judged on the logged
    # events in ClickHouse (sample ratio mismatch halts; a worse guardrail rolls back).
    analysis_address: str = ""
    # JSON list in MLMESH_REGISTRY_SEED, e.g. [{"name": "tabular-classifier", "kind": "tabular",
    # "directory": "/app/model_repository/tabular_classifier"}]; retried until Triton takes them.
    seed: list[SeedSpec] = []
