"""Settings of the gateway's event emission (nested as `events` in GatewaySettings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from services.common.kafka import KafkaSettings
from services.common.settings import STATE_DIR
from services.gateway.spool import FsyncPolicy


class EventSettings(BaseModel):
    enabled: bool = False
    # Convert and produce in a child process (EventProcess): protobuf conversion and librdkafka's
    # threads then no longer take the GIL and CPU from the serving process's asyncio loop.
    # False: in-process (EventEmitter), e.g. where a process may not start children.
    out_of_process: bool = True
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
    # How long the sender gathers events before converting and producing them: one wake-up of
    # its thread (and one GIL hand-over) per batch rather than per event. librdkafka batches
    # and compresses on its own threads; its linger.ms is moot, each batch is flushed.
    linger_ms: int = Field(default=20, ge=0)
    # How long a batch may wait for its acks before what is left is purged and spooled (also
    # bounds how long the producer retries against a dead broker). An outage that librdkafka
    # sees (all broker connections down) ends the wait at once.
    delivery_timeout_s: float = Field(default=5.0, ge=1.0)
    # Kafka record-batch compression (librdkafka compression.type). Every consumer must decode
    # it: kafka-python needs the `lz4` package for lz4 (installed) and `zstandard` for zstd (not
    # installed here: the logger could not read zstd batches); snappy needs python-snappy.
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # How often to check whether an unreachable broker is back.
    probe_interval_s: float = Field(default=1.0, gt=0)
    # out_of_process only: a child that says nothing for this long (it reports at least once a
    # second), or leaves what was written to it unread for this long, is hung: it is killed and
    # replaced, and the next child replays the spool (0 = never).
    child_stall_timeout_s: float = Field(default=10.0, ge=0)
