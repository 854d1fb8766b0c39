"""Settings of the drift / A-B analysis service (environment prefix MLMESH_DRIFT_)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from services.common.kafka import KafkaSettings
from services.common.settings import ServerSettings
from services.drift.statistics import DriftThresholds


class ThresholdSettings(BaseModel):
    """Cut-offs that turn drift statistics into ok / warn / alert (see statistics.DriftThresholds)."""

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    js_warn: float = 0.018
    js_alert: float = 0.036
    wasserstein_warn: float = 0.3
    wasserstein_alert: float = 0.45
    alpha_warn: float = 0.01
    alpha_alert: float = 0.001
    ks_statistic_warn: float = 0.125
    ks_statistic_alert: float = 0.175

    def thresholds(self) -> DriftThresholds:
        return DriftThresholds(**self.model_dump())


class ScheduledCheck(BaseModel):
    """One model whose recent traffic is compared with its reference profile on every tick."""

    model: str
    model_version: str = ""  # filter on the window; also picks the newest profile of that version
    profile_id: str = ""  # empty: the newest profile of the model
    window_minutes: int = Field(default=60, ge=1)


class DriftSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_DRIFT_", extra="forbid", env_nested_delimiter="__")

    port: int = 50055
    # Empty: use the store client the host process gives (the logger's, with embedded chdb: the
    # service then opens its own session on the same engine). Standalone (`python -m
    # services.drift`) needs a DSN, in practice a ClickHouse server: http(s)://host:8123.
    clickhouse_dsn: str = ""
    # Read the event tables with FINAL (exact under redelivery, as the logger's canonical queries
    # do). Off: a redelivered, not yet merged batch counts twice; faster on many unmerged parts.
    read_final: bool = True
    query_timeout_s: float = Field(default=120.0, gt=0)  # ClickHouse max_execution_time per query
    # Reference profiles built from a window.
    n_bins: int = Field(default=10, ge=2, le=64)
    max_points: int = Field(default=2001, ge=100, le=20_000)  # quantile sketch size (KS, Wasserstein)
    reference_sample_size: int = Field(default=100_000, ge=10_000)  # values per feature for the sketch
    max_features: int = Field(default=512, ge=1)
    # KS and Wasserstein of a window: counts on this many equal-width cells over the reference's
    # [0.1 %, 99.9 %] range (profiles snap their bin edges to these cells). Changing it makes
    # existing profiles' bins be counted separately (slower), not wrong.
    grid_cells: int = Field(default=1000, ge=50, le=20_000)
    # Windows with more predictions than this are checked on a uniform sample of about this many,
    # read by primary-key range (prediction ids are random hex: ids below a bound). 0: every row.
    drift_sample_rows: int = Field(default=0, ge=0)
    thresholds: ThresholdSettings = ThresholdSettings()
    # Scheduled checks: every schedule_interval_s (0: off), each check publishes an AlertEvent to
    # kafka.alerts_topic for every feature whose status reaches alert_min_status.
    schedule_interval_s: float = Field(default=0.0, ge=0)
    checks: list[ScheduledCheck] = Field(default_factory=list)
    alert_min_status: Literal["warn", "alert"] = "alert"
    kafka: KafkaSettings = KafkaSettings()
