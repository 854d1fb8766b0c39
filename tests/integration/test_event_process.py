"""EventProcess (the emitter in a child process) against the real Tansu broker: delivery, a
killed child, a killed gateway, a spool owned by someone else.

Records, settings, the broker fixture and the checks come from test_event_emission.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from signal import SIGINT, SIGKILL, SIGSTOP, SIGTERM

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from services.common.gen.mlmesh.v1 import events_pb2
from services.common.kafka import KafkaSettings, make_consumer
from services.common.tansu import TansuBroker
from services.gateway.event_process import EventProcess
from services.gateway.events import EventEmitter
from tests.integration.test_event_emission import (  # the per-test broker fixture, too
    broker,  # noqa: F401
    check_feedback,
    check_prediction,
    consume,
    feedback_records,
    record,
    settings_for,
    spawn_script,
    wait_for,
)

pytestmark = pytest.mark.integration


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (its pipes are closed already)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def consume_keys(kafka: KafkaSettings, wanted: set[bytes], timeout_s: float = 20.0) -> list[ConsumerRecord]:
    """Predictions until every wanted key was seen (others may come along), then a little longer
    so duplicates would show up too."""
    consumer = make_consumer(kafka, f"test-{uuid.uuid4().hex}", [kafka.predictions_topic])
    messages: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                messages.extend(batch)
            if wanted <= {m.key for m in messages}:
                settle_until = settle_until or time.monotonic() + 0.5
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return messages


def test_every_event_arrives_exactly_once_through_the_child(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    events = EventProcess(settings)
    events.start()
    run = uuid.uuid4().hex[:8]
    try:
        assert events.child_pid is not None and events.child_pid != os.getpid()
        for i in range(500):
            assert events.on_complete(record(i, run)) is None
        feedback = feedback_records(run)
        assert all(events.on_feedback(fb) for fb in feedback)
        wait_for(lambda: events.stats()["delivered"] == 520, 20, "520 acknowledged events", events)
        assert events.stats()["connected"] == 1
    finally:
        events.close(timeout_s=5)

    stats = events.stats()
    assert list(stats) == list(EventEmitter(settings).stats())
    assert stats["emitted"] == stats["delivered"] == 520
    assert stats["spooled"] == stats["shed"] == stats["dropped"] == stats["queue_depth"] == 0
    assert stats["connected"] == 0
    assert events.on_feedback(feedback[0]) is False  # after close: shed and counted, never raised
    events.on_complete(record(500, run))
    assert events.stats()["shed_closed"] == 2 and events.stats()["shed"] == 2

    kafka = settings.kafka
    received = consume(kafka, [kafka.predictions_topic, kafka.feedback_topic], 520)
    messages = [m for m in received if m.topic == kafka.predictions_topic]
    assert len(messages) == 500 and len({m.key for m in messages}) == 500
    numbers = {check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages}
    assert numbers == set(range(500))
    check_feedback([m for m in received if m.topic == kafka.feedback_topic], run)


def test_a_child_signalled_with_its_gateway_keeps_going_until_the_gateway_closes_it(
    broker: TansuBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Ctrl-C or a supervisor's SIGTERM reach the whole process group: the gateway drains first,
    then closes its child, which must still be there to flush."""
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    events = EventProcess(settings)
    events.start()
    run = uuid.uuid4().hex[:8]
    try:
        child = events.child_pid
        assert child is not None
        os.kill(child, SIGINT)
        os.kill(child, SIGTERM)
        for i in range(100):
            events.on_complete(record(i, run))
        wait_for(lambda: events.stats()["delivered"] == 100, 20, "100 acknowledged events", events)
        assert events.child_pid == child and events.restarts == 0
    finally:
        events.close(timeout_s=5)
    assert process_gone(child)


def test_a_killed_child_is_replaced_and_emission_goes_on(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    events = EventProcess(settings)
    events.start()
    run = uuid.uuid4().hex[:8]
    try:
        for i in range(100):
            events.on_complete(record(i, run))
        wait_for(lambda: events.stats()["delivered"] == 100, 20, "the first 100 events", events)

        first_child = events.child_pid
        assert first_child is not None
        for i in range(100, 200):  # in flight when the child dies: these may be lost
            events.on_complete(record(i, run))
        os.kill(first_child, SIGKILL)
        deadline = time.monotonic() + 5
        while not process_gone(first_child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_gone(first_child)
        for i in range(200, 300):  # while no child runs: they wait in the gateway and are resent
            events.on_complete(record(i, run))
            time.sleep(0.005)
        wait_for(
            lambda: events.child_pid not in (None, first_child) and events.stats()["connected"] == 1,
            20,
            "a new child, connected",
            events,
        )
        assert events.restarts == 1
        for i in range(300, 400):  # after the restart
            events.on_complete(record(i, run))
        wait_for(lambda: events.stats()["queue_depth"] == 0, 20, "the queues to drain", events)
    finally:
        events.close(timeout_s=5)
    stats = events.stats()
    assert stats["emitted"] == 400 and stats["shed"] == stats["dropped"] == 0

    wanted = {f"{run}-{i:06d}".encode() for i in [*range(100), *range(200, 400)]}
    messages = consume_keys(settings.kafka, wanted)
    numbers = [check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages]
    assert {f"{run}-{i:06d}".encode() for i in numbers} >= wanted
    assert len(numbers) == len(set(numbers))  # none delivered twice
    assert stats["delivered"] + stats["replayed"] >= len(wanted)


def test_close_returns_even_when_the_child_hangs(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    events = EventProcess(settings)
    events.start()
    child = events.child_pid
    assert child is not None
    try:
        os.kill(child, SIGSTOP)  # alive, but reads and answers nothing
        for i in range(50):
            events.on_complete(record(i, uuid.uuid4().hex[:8]))
    finally:
        events.close(timeout_s=1)  # waits its timeout plus a grace period, then kills the child
    assert process_gone(child)
    assert events.stats()["connected"] == 0


def test_a_hung_child_is_killed_and_replaced_by_the_watchdog(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    settings = settings_for(broker.bootstrap, tmp_path / "spool", child_stall_timeout_s=1.5)
    events = EventProcess(settings)
    events.start()
    run = uuid.uuid4().hex[:8]
    try:
        time.sleep(3.0)  # idle for twice the timeout: the heartbeat keeps a healthy child alive
        hung = events.child_pid
        assert hung is not None and events.stall_kills == 0
        os.kill(hung, SIGSTOP)  # alive, but reads and answers nothing
        for i in range(50):  # written to the hung child (lost with it) or resent to the next one
            events.on_complete(record(i, run))
        wait_for(
            lambda: events.child_pid not in (None, hung) and events.stats()["connected"] == 1,
            20,
            "the watchdog to replace the hung child",
            events,
        )
        assert events.stall_kills == 1 and process_gone(hung)
        for i in range(100, 200):
            events.on_complete(record(i, run))
        wait_for(lambda: events.stats()["queue_depth"] == 0, 20, "the queues to drain", events)
    finally:
        events.close(timeout_s=5)
    wanted = {f"{run}-{i:06d}".encode() for i in range(100, 200)}
    numbers = [
        check_prediction(events_pb2.PredictionEvent.FromString(m.value), run)
        for m in consume_keys(settings.kafka, wanted)
    ]
    assert {f"{run}-{i:06d}".encode() for i in numbers} >= wanted
    assert len(numbers) == len(set(numbers))  # none delivered twice


ORPHANING_GATEWAY = """
import os, signal, sys, time
from pathlib import Path
from tests.integration.test_event_emission import record, settings_for
from services.gateway.event_process import EventProcess

bootstrap, spool_dir, run, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# A long gather window: the child still holds the records (pipe, queue) when we die.
events = EventProcess(settings_for(bootstrap, spool_dir, linger_ms=2000))
events.start()
print("CHILD", events.child_pid, flush=True)
for i in range(count):
    events.on_complete(record(i, run))
while events.forwarded < count:
    time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush
"""


def test_an_orphaned_child_flushes_what_it_holds(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    spool_dir = tmp_path / "spool"
    run = uuid.uuid4().hex[:8]
    gateway_log = tmp_path / "gateway.log"
    gateway = spawn_script(ORPHANING_GATEWAY, [broker.bootstrap, str(spool_dir), run, "300"], gateway_log)
    try:
        assert gateway.stdout is not None
        words = gateway.stdout.readline().split()
        assert words[:1] == ["CHILD"], gateway_log.read_text()[-3000:]
        child_pid = int(words[1])
        assert gateway.wait(20) == -SIGKILL, gateway_log.read_text()[-3000:]
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    deadline = time.monotonic() + 15
    while not process_gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child_pid), "the orphaned child did not exit"

    kafka = settings_for(broker.bootstrap, spool_dir).kafka
    messages = consume(kafka, [kafka.predictions_topic], 300)
    numbers = sorted(check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages)
    assert numbers == list(range(300)), gateway_log.read_text()[-3000:]


def test_start_fails_with_the_childs_reason_when_the_spool_is_taken(broker: TansuBroker, tmp_path: Path) -> None:  # noqa: F811
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    owner = EventEmitter(settings)
    owner.start()
    try:
        events = EventProcess(settings, spool_lock_wait_s=1.5)  # retried meanwhile, then given up
        with pytest.raises(RuntimeError, match=r"SpoolLocked: spool directory .* is in use by another process"):
            events.start()
        assert events.child_pid is None
        events.close(timeout_s=1)  # never started: nothing to stop, returns at once

        # A lock that goes away while start() retries (the event process of a killed gateway
        # that finished its flush): the successor starts.
        release = threading.Timer(1.0, owner.close, kwargs={"timeout_s": 2})
        release.start()
        successor = EventProcess(settings)
        successor.start()
        successor.close(timeout_s=2)
        release.join()
    finally:
        owner.close(timeout_s=2)
