from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import STATE_DIR, ServerSettings
from services.gateway.events_settings import EventSettings


class TenantLimits(BaseModel):
    requests_per_s: float = Field(default=200.0, gt=0)
    burst: int = Field(default=400, ge=1)
    tokens_per_min: int = Field(default=120_000, ge=1)


class RequestLimits(BaseModel):
    max_tensor_bytes: int = 4 * 1024 * 1024
    max_prompt_chars: int = 16_000
    max_tokens: int = 2048
    default_max_tokens: int = 128


class GatewaySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_GATEWAY_", extra="forbid", env_nested_delimiter="__")

    port: int = 50051
    # Empty: the router is hosted in this process and called directly (no loopback hop).
    router_address: str = ""
    keys_db: Path = STATE_DIR / "gateway.db"
    default_limits: TenantLimits = TenantLimits()
    request_limits: RequestLimits = RequestLimits()
    predict_timeout_s: float = 30.0
    generate_timeout_s: float = 300.0
    key_cache_ttl_s: float = 30.0
    model_refresh_interval_s: float = 2.0
    # Prediction and feedback events to Kafka (MLMESH_GATEWAY_EVENTS__ENABLED=true,
    # MLMESH_GATEWAY_EVENTS__KAFKA__BOOTSTRAP_SERVERS=host:port).
    events: EventSettings = EventSettings()
