"""Kafka fixtures: one real Tansu broker per test session (memory storage, loopback port)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.net import free_port
from services.common.tansu import TansuBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A running Tansu broker; tests create their own uniquely named topics on it."""
    broker = TansuBroker(free_port(), log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    broker.start()
    try:
        broker.wait_ready()
    except Exception as error:
        broker.kill()
        pytest.fail(f"could not start tansu: {error}")
    yield broker
    broker.stop()
