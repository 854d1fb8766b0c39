"""The librdkafka producer configuration of the event emitter (no broker needed: librdkafka
validates its properties when the producer is created; delivery is tested in integration)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from services.common.kafka import KafkaSettings, make_confluent_producer
from services.common.net import free_port
from services.gateway.events import producer_config
from services.gateway.events_settings import EventSettings


def test_connection_settings_map_to_librdkafka_names() -> None:
    settings = KafkaSettings(
        bootstrap_servers=" kafka-1:9093, kafka-2:9093 ,",
        client_id="gw-1",
        request_timeout_ms=15_000,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="mesh",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile="/etc/ssl/ca.pem",
    )
    assert settings.librdkafka_options() == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "client.id": "gw-1",
        "request.timeout.ms": 15_000,
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "mesh",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }


def test_plaintext_settings_carry_no_credentials() -> None:
    options = KafkaSettings().librdkafka_options()
    assert options["security.protocol"] == "plaintext"
    assert not any(name.startswith(("sasl.", "ssl.")) for name in options)


@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_librdkafka_accepts_the_emitters_configuration(compression: Any) -> None:
    settings = EventSettings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),  # nothing listens
        compression=compression,
        delivery_timeout_s=1.0,
        batch_max_events=250_000,
    )
    config = producer_config(settings)
    assert config["message.timeout.ms"] > settings.delivery_timeout_s * 1000  # our deadline comes first
    assert config["queue.buffering.max.messages"] >= settings.batch_max_events  # one batch always fits
    producer = make_confluent_producer(settings.kafka, **config)  # raises KafkaException if invalid
    producer.purge()
    producer.close()


def test_overrides_win_and_invalid_properties_fail_loudly() -> None:
    from confluent_kafka import KafkaException

    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaException, match="acks"):
        make_confluent_producer(kafka, acks="sometimes")
