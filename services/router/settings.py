from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.routing import ModelRoute, RouteTable, RouteTarget
from services.common.settings import STATE_DIR, ServerSettings
from services.router.breaker import BreakerConfig


class RouteConfig(BaseModel):
    """Where a public model name is served: a Triton model (and version; empty = newest loaded)."""

    triton_model: str
    version: str = ""
    kind: Literal["tabular", "llm"]


DEFAULT_ROUTES = {
    "tabular-classifier": RouteConfig(triton_model="tabular_classifier", kind="tabular"),
    "llm": RouteConfig(triton_model="llm", kind="llm"),
}


def static_table(routes: Mapping[str, RouteConfig]) -> RouteTable:
    """The static routes as a version-0 routing table (any table from the registry replaces it)."""
    return RouteTable(
        0,
        tuple(
            ModelRoute(name, cfg.kind, RouteTarget(triton_model=cfg.triton_model, triton_version=cfg.version))
            for name, cfg in routes.items()
        ),
    )


class BreakerSettings(BaseModel):
    """Per-target circuit breaker of experiment variants (see services.router.breaker)."""

    failure_threshold: int = Field(default=5, ge=0)  # consecutive failures that open it (0 = off)
    failure_rate: float = Field(default=0.5, ge=0.0, le=1.0)  # failure share over the window (0 = off)
    window: int = Field(default=20, ge=1)
    min_calls: int = Field(default=10, ge=1)
    cooldown_s: float = Field(default=5.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)

    def config(self) -> BreakerConfig:
        return BreakerConfig(**self.model_dump())


def _default_router_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RouterSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_ROUTER_", extra="forbid", env_nested_delimiter="__")

    port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    # Static routing table: served as table version 0 until (and unless) the registry pushes one.
    routes: dict[str, RouteConfig] = DEFAULT_ROUTES
    default_timeout_s: float = 30.0
    # Predict calls to one batching model that may be in flight before new ones are merged
    # into the next call (0 = never merge).
    batch_max_in_flight: int = 1
    # Adaptive gathering (services.router.batching): for up to this long after a call to a
    # batching model comes back, new Predicts wait until as many rows are queued as it carried
    # plus those already waiting; a lone caller is never held (0 = off: a free slot sends at
    # once). 1.5 ms covers the return of 8-32 closed-loop callers on 2 cores (bench.run: 1.0 ms
    # gathered too few at c=8).
    batch_gather_max_us: int = Field(default=1500, ge=0)
    # Predicts as messages on one ModelStreamInfer stream per model (less CPU and latency per
    # call) or, when false, one unary ModelInfer each (Triton then also sees each deadline).
    triton_predict_stream: bool = True
    model_refresh_interval_s: float = 2.0
    # The registry's address ("" = static routes only). Its tables arrive over WatchRoutes and are
    # cached in table_cache_path, so a router restarted while the registry is down serves its last one.
    registry_address: str = ""
    router_id: str = Field(default_factory=_default_router_id)
    table_cache_path: Path = STATE_DIR / "router-table.json"
    metrics_report_interval_s: float = Field(default=1.0, gt=0)
    breaker: BreakerSettings = BreakerSettings()
    # Shadow copies in flight at once; more are dropped (and counted), never queued.
    shadow_max_in_flight: int = Field(default=64, ge=0)

    def static_table(self) -> RouteTable:
        return static_table(self.routes)
