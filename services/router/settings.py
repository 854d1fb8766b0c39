from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RouteConfig(BaseModel):
    """Where a public model name is served: a Triton model (and version; empty = newest loaded)."""

    triton_model: str
    version: str = ""
    kind: Literal["tabular", "llm"]


DEFAULT_ROUTES = {
    "tabular-classifier": RouteConfig(triton_model="tabular_classifier", kind="tabular"),
    "llm": RouteConfig(triton_model="llm", kind="llm"),
}


class RouterSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_ROUTER_", extra="forbid", env_nested_delimiter="__")

    port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    # Static routing table for now; the registry will push tables over its watch stream.
    routes: dict[str, RouteConfig] = DEFAULT_ROUTES
    default_timeout_s: float = 30.0
    # Predict calls to one batching model that may be in flight before new ones are merged
    # into the next call (0 = never merge).
    batch_max_in_flight: int = 1
    model_refresh_interval_s: float = 2.0
