"""Settings of the gateway's event emission (nested as `events` in GatewaySettings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from services.common.kafka import KafkaSettings
from services.common.settings import STATE_DIR
from services.gateway.spool import FsyncPolicy


class EventSettings(BaseModel):
    enabled: bool = False
    kafka: KafkaSettings = KafkaSettings()
    # Where events wait while Kafka is unreachable; one gateway process per directory.
    spool_dir: Path = STATE_DIR / "spool"
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    spool_segment_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # "interval": fsync at most once a second and when idle (a crash loses <= ~1 s of spooled
    # events); "always": every record (slow); "never": leave it to the OS.
    spool_fsync: FsyncPolicy = "interval"
    queue_max_events: int = Field(default=100_000, ge=1)
    capture_max_values: int = Field(default=256, ge=0)
    # Records per produce batch (and per spool replay batch).
    batch_max_events: int = Field(default=1000, ge=1)
    # Records replayed between two looks at the live queue, so new events keep moving.
    replay_chunk_events: int = Field(default=5000, ge=1)
    # How long the sender gathers events into one produce request. kafka-python costs ~1 ms of
    # CPU per request (measured): 20 ms cut emission's CPU from ~320 to ~130 us/event at 2k/s.
    linger_ms: int = Field(default=20, ge=0)
    # How long a batch may wait for its acks before it goes to the spool (also bounds how long
    # the producer retries against a dead broker).
    delivery_timeout_s: float = Field(default=5.0, ge=1.0)
    # How often to check whether an unreachable broker is back.
    probe_interval_s: float = Field(default=1.0, gt=0)
