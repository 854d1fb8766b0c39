"""The one Kafka helper module: settings, explicit topic creation, producer and consumer factories.

kafka-python is synchronous: call these from a thread, never from the asyncio loop. The same code
talks to Tansu (embedded default) and Apache Kafka (production); see RUNBOOK-REAL-COMPONENTS.md.

Two producers: `make_producer` (kafka-python, for the logger's dead letters, tests and benches)
and `make_confluent_producer` (librdkafka, for the gateway's event emission: batching,
compression and network I/O run in C threads, outside the GIL of the process that serves).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import confluent_kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from pydantic import BaseModel, Field, SecretStr

log = logging.getLogger(__name__)

# kafka-python checks record-batch CRC32C in pure Python unless the C `crc32c` package is
# installed; measured here that check costs ~70% of consume time (10k vs 33k+ records/s).
# TCP and the broker already checksum the data, so we only pay for it when it is cheap.
HAS_C_CRC32C = importlib.util.find_spec("crc32c") is not None


class KafkaSettings(BaseModel):
    """Where the event bus is and what its topics are called (nested in each service's settings)."""

    bootstrap_servers: str = "127.0.0.1:9092"  # comma-separated host:port list
    client_id: str = "mlmesh"
    predictions_topic: str = "mlmesh.predictions.v1"
    feedback_topic: str = "mlmesh.feedback.v1"
    alerts_topic: str = "mlmesh.alerts.v1"
    deadletter_topic: str = "mlmesh.deadletter.v1"
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    # Production brokers (Apache Kafka with TLS/SASL); PLAINTEXT for Tansu on loopback.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None

    @property
    def topics(self) -> list[str]:
        return [self.predictions_topic, self.feedback_topic, self.alerts_topic, self.deadletter_topic]

    def connection_options(self) -> dict[str, Any]:
        """Options every kafka-python client (admin, producer, consumer) accepts."""
        options: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.ssl_cafile:
            options["ssl_cafile"] = self.ssl_cafile
        return options

    def librdkafka_options(self) -> dict[str, Any]:
        """The same connection settings under librdkafka's (confluent-kafka's) property names."""
        options: dict[str, Any] = {
            "bootstrap.servers": ",".join(s.strip() for s in self.bootstrap_servers.split(",") if s.strip()),
            "client.id": self.client_id,
            "request.timeout.ms": self.request_timeout_ms,
            "security.protocol": self.security_protocol.lower(),
        }
        if self.sasl_mechanism:
            options["sasl.mechanism"] = self.sasl_mechanism
            options["sasl.username"] = self.sasl_username
            options["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.ssl_cafile:
            options["ssl.ca.location"] = self.ssl_cafile
        return options


def ensure_topics(settings: KafkaSettings, topics: list[str] | None = None, *, timeout_s: float = 30.0) -> list[str]:
    """Creates the topics that do not exist yet (all four by default); returns the ones created.

    Explicit creation because auto-created topics get the broker's default partition count; no
    describe_* call is made (they trip over Tansu's permissions field). Raises KafkaTimeoutError
    when no broker answers within timeout_s.
    """
    wanted = topics if topics is not None else settings.topics
    # kafka-python keeps retrying the bootstrap itself, for up to bootstrap_timeout_ms.
    admin = KafkaAdminClient(**settings.connection_options(), bootstrap_timeout_ms=int(timeout_s * 1000))
    created: list[str] = []
    try:
        request = {
            name: {"num_partitions": settings.partitions, "replication_factor": settings.replication_factor}
            for name in wanted
        }
        # raise_errors=False: "already exists" for one topic must not hide the others' results.
        response = admin.create_topics(request, timeout_ms=settings.request_timeout_ms, raise_errors=False)
        for topic in response["topics"]:
            error = kafka_errors.for_code(topic["error_code"])
            if error is kafka_errors.NoError:
                created.append(topic["name"])
            elif error is not kafka_errors.TopicAlreadyExistsError:
                raise error(f"cannot create topic {topic['name']}: {topic.get('error_message') or error.__name__}")
    finally:
        admin.close()
    if created:
        log.info("created kafka topics %s (%d partitions)", ", ".join(created), settings.partitions)
    return created


def make_producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer for protobuf payloads: keys and values are bytes (no serializers).

    acks=all with idempotence (kafka-python's default, works on Tansu) so a retried send cannot
    duplicate or reorder within a partition; a small linger batches hot-path events.
    """
    config: dict[str, Any] = {
        **settings.connection_options(),
        "acks": "all",
        "linger_ms": 5,
        "retries": 10,
        "retry_backoff_ms": 100,
        "batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        # Missing topics are a configuration error: ensure_topics creates them with our layout.
        "allow_auto_create_topics": False,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def make_confluent_producer(settings: KafkaSettings, **overrides: Any) -> confluent_kafka.Producer:
    """A librdkafka producer for protobuf payloads (bytes keys and values); overrides use
    librdkafka property names ("linger.ms", "compression.type", callbacks such as "error_cb").

    acks=all with idempotence (Tansu hands out producer ids: checked against the real broker),
    so librdkafka's retries cannot duplicate or reorder within a partition. murmur2_random is
    the Java client's (and kafka-python's) key hash: a prediction id lands on the same partition
    whichever client produced it. lz4 because every client decodes it, kafka-python included
    (with the `lz4` package); zstd would need `zstandard`, which the logger's kafka-python lacks.
    Nothing here waits for the broker: produce() only queues, poll()/flush() serve the reports.
    """
    config: dict[str, Any] = {
        **settings.librdkafka_options(),
        "acks": "all",
        "enable.idempotence": True,
        "partitioner": "murmur2_random",
        "compression.type": "lz4",
        "linger.ms": 5,
        "message.max.bytes": 4 * 1024 * 1024,
        # Missing topics are a configuration error: ensure_topics creates them with our layout.
        "allow.auto.create.topics": False,
        # librdkafka's log lines go through `logging`, served by poll()/flush() on the caller's thread.
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
        "log.connection.close": False,
    }
    config.update(overrides)
    return confluent_kafka.Producer(config)


def make_consumer(settings: KafkaSettings, group_id: str | None, topics: list[str], **overrides: Any) -> KafkaConsumer:
    """A consumer that commits only when told to (at-least-once); subscribes to `topics` if any.

    session/heartbeat values from the runbook: with kafka-python's defaults every group join on
    Tansu waits ~23 s. Fetch sizes are generous because consumers here work in large batches.
    """
    config: dict[str, Any] = {
        **settings.connection_options(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "max_poll_records": 5000,
        # Tansu answers a waiting fetch only when fetch_max_wait_ms expires, even if records
        # arrived meanwhile (measured p50 132 ms at the default 500, 8 ms at 20).
        "fetch_max_wait_ms": 50,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 16 * 1024 * 1024,
        "check_crcs": HAS_C_CRC32C,
        "allow_auto_create_topics": False,
    }
    config.update(overrides)
    return KafkaConsumer(*topics, **config)
