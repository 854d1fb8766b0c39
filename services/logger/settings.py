from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.kafka import KafkaSettings
from services.common.settings import STATE_DIR, ServerSettings
from services.logger.pii import DEFAULT_POLICY, POLICY_FIELDS, PiiAction, PiiPolicy


class RetentionSettings(BaseModel):
    """Days a row is kept (ClickHouse TTL on the event time); changing them re-applies the TTL."""

    predictions_days: int = Field(default=90, ge=1)
    feedback_days: int = Field(default=365, ge=1)
    alerts_days: int = Field(default=365, ge=1)


class LoggerSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="MLMESH_LOGGER_", extra="forbid", env_nested_delimiter="__")

    port: int = 50053
    kafka: KafkaSettings = KafkaSettings()
    # chdb:///abs/path (embedded, this process owns it), chdb://memory, or http(s)://host:8123.
    clickhouse_dsn: str = f"chdb://{STATE_DIR / 'clickhouse'}"
    # ClickHouse server before 25.7 only: the ingest schema's file name in the server's
    # format_schemas directory (`python -m services.logger.ingest_schema > mlmesh_ingest.proto`).
    # Empty: the schema travels with each insert (chdb: a file in the store, written for you).
    clickhouse_ingest_schema_file: str = ""
    group_id: str = "mlmesh-logger"
    consume_alerts: bool = True  # store mlmesh.alerts.v1 too (drift publishes alerts there)
    kafka_startup_wait_s: float = Field(default=10.0, ge=0)  # then serve anyway; the consumer retries
    batch_max_events: int = Field(default=20_000, ge=1)  # caps a batch under backlog (bigger = fewer parts)
    batch_max_wait_ms: int = Field(default=200, ge=1)
    retention: RetentionSettings = RetentionSettings()
    # Only fields named here change; the others keep DEFAULT_POLICY. JSON in the environment:
    # MLMESH_LOGGER_PII='{"unit_id": "hash"}'.
    pii: dict[str, PiiAction] = Field(default_factory=lambda: dict(DEFAULT_POLICY))
    # Secret for the `hash` policy and the privacy audit's subject key. Unset: generated once
    # into pii_hash_salt_file (0600) so hashes stay stable across restarts.
    pii_hash_salt: SecretStr | None = None
    pii_hash_salt_file: Path = STATE_DIR / "logger" / "pii-hash-salt"
    query_max_rows: int = Field(default=10_000, ge=1)  # cap for the Query RPC
    query_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("pii")
    @classmethod
    def _known_fields(cls, value: dict[str, PiiAction]) -> dict[str, PiiAction]:
        unknown = set(value) - POLICY_FIELDS
        if unknown:
            raise ValueError(f"unknown PII fields {sorted(unknown)}; known: {sorted(POLICY_FIELDS)}")
        return {**DEFAULT_POLICY, **value}

    def resolve_salt(self) -> bytes:
        if self.pii_hash_salt is not None:
            return self.pii_hash_salt.get_secret_value().encode()
        path = self.pii_hash_salt_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside then hard-linked: link() fails if another process won the race, and
            # nobody can read a half-written salt.
            partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
            try:
                os.link(partial, path)
            except FileExistsError:
                pass
            finally:
                partial.unlink()
        salt = path.read_text().strip()
        if not salt:
            raise ValueError(f"{path} is empty: delete it or set MLMESH_LOGGER_PII_HASH_SALT")
        return salt.encode()

    def pii_policy(self) -> PiiPolicy:
        return PiiPolicy(self.pii, self.resolve_salt())
