"""EventEmitter against the real Tansu broker: delivery, outages, a full spool, a crashed process.

The emitter is driven directly with CompletedRequest records (gateway-level tests live with the
gateway). Tansu here has memory storage only: a restarted broker comes back empty, so events
delivered before an outage are consumed before the broker goes down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.partitioner.default import murmur2

from services.common.domain import (
    GenerateInput,
    GenerationUsage,
    PredictInput,
    PredictResult,
    ServedBy,
    TensorData,
)
from services.common.gen.mlmesh.v1 import events_pb2
from services.common.kafka import KafkaSettings, make_consumer
from services.common.net import free_port
from services.common.settings import REPO_ROOT
from services.common.tansu import TansuBroker
from services.gateway.event_process import EventProcess
from services.gateway.events import EventEmitter
from services.gateway.events_settings import EventSettings
from services.gateway.hooks import CompletedRequest, FeedbackRecord

pytestmark = pytest.mark.integration

FEATURES = np.linspace(0.1, 3.0, 30, dtype="<f4").reshape(1, 30)
SERVED = ServedBy("tabular-classifier", "2", "exp-events", "treatment")


def record(i: int, run: str) -> CompletedRequest:
    """Prediction i of a run; every tenth one is a Generate."""
    prediction_id = f"{run}-{i:06d}"
    if i % 10 == 0:
        return CompletedRequest(
            prediction_id=prediction_id,
            tenant="acme",
            rpc="Generate",
            request=GenerateInput(model="llm", prompt=f"prompt {i}", max_tokens=8, request_id=f"req-{i}"),
            served_by=ServedBy("llm", "1"),
            status="OK",
            error="",
            started_at_unix=time.time(),
            latency_ms=50.0,
            trace_id=f"{i:032x}",
            completion_text=f"completion {i}",
            finish_reason="length",
            usage=GenerationUsage(input_tokens=3, output_tokens=8, time_to_first_token_ms=12.5, total_time_ms=50.0),
        )
    label = TensorData("label", "INT64", (1,), np.array([i % 2], dtype="<i8").tobytes())
    return CompletedRequest(
        prediction_id=prediction_id,
        tenant="acme",
        rpc="Predict",
        request=PredictInput(
            model="tabular-classifier",
            inputs=[TensorData("features", "FP32", (1, 30), FEATURES.tobytes())],
            request_id=f"req-{i}",
            unit_id=f"user-{i % 7}",
        ),
        served_by=SERVED,
        status="OK",
        error="",
        started_at_unix=time.time(),
        latency_ms=1.25,
        trace_id=f"{i:032x}",
        result=PredictResult(prediction_id, SERVED, [label]),
    )


def check_prediction(event: events_pb2.PredictionEvent, run: str) -> int:
    """Asserts the fields of a decoded event against the record it came from; returns i."""
    assert event.schema_version == 1
    run_id, _, number = event.prediction_id.rpartition("-")
    assert run_id == run
    i = int(number)
    assert (event.tenant, event.request_id, event.trace_id) == ("acme", f"req-{i}", f"{i:032x}")
    assert event.status_code == "OK"
    assert event.started_at.seconds > 0
    if i % 10 == 0:
        assert (event.rpc, event.model, event.model_version) == ("Generate", "llm", "1")
        assert (event.prompt, event.completion, event.finish_reason) == (f"prompt {i}", f"completion {i}", "length")
        assert (event.input_tokens, event.output_tokens, event.time_to_first_token_ms) == (3, 8, 12.5)
        assert event.max_tokens == 8 and not event.inputs
    else:
        assert (event.rpc, event.model, event.model_version) == ("Predict", "tabular-classifier", "2")
        assert (event.experiment, event.variant, event.unit_id) == ("exp-events", "treatment", f"user-{i % 7}")
        (features,) = event.inputs
        assert (features.name, features.dtype, list(features.shape)) == ("features", "FP32", [1, 30])
        assert list(features.values) == FEATURES.astype(np.float64).ravel().tolist()
        assert not features.truncated
        (label,) = event.outputs
        assert (label.name, list(label.values)) == ("label", [float(i % 2)])
        assert event.latency_ms == 1.25
    return i


def settings_for(bootstrap: str, spool_dir: Path, **overrides: object) -> EventSettings:
    # Short timeouts: an outage is noticed within ~2 s and the broker's return within 0.2 s.
    values: dict[str, object] = {
        "enabled": True,
        "kafka": KafkaSettings(bootstrap_servers=bootstrap, partitions=3),
        "spool_dir": spool_dir,
        "delivery_timeout_s": 2.0,
        "probe_interval_s": 0.2,
        **overrides,
    }
    return EventSettings.model_validate(values)


def consume(kafka: KafkaSettings, topics: list[str], expected: int, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Reads `expected` messages with a fresh consumer group, then polls a little longer so
    duplicates would show up too. (A group join on Tansu takes ~3 s: one consumer per test.)"""
    consumer = make_consumer(kafka, f"test-{uuid.uuid4().hex}", topics)
    messages: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                messages.extend(batch)
            if len(messages) >= expected:
                settle_until = settle_until or time.monotonic() + 0.5
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return messages


def feedback_records(run: str, count: int = 20) -> list[FeedbackRecord]:
    """Feedback for predictions 0..count-1 of a run; odd ones carry a rating, even ones none."""
    return [
        FeedbackRecord(
            f"fb-{i}", f"{run}-{i:06d}", "acme", "user-1", time.time(), "1", 4.0 if i % 2 else None, "", "", ""
        )
        for i in range(count)
    ]


def check_feedback(messages: list[ConsumerRecord], run: str, count: int = 20) -> None:
    """feedback_records(run, count) as consumed: each once, the rating present only where given."""
    decoded = {m.key: events_pb2.FeedbackEvent.FromString(m.value) for m in messages}
    assert len(messages) == len(decoded) == count
    assert decoded[f"{run}-{1:06d}".encode()].rating == 4.0
    assert not decoded[f"{run}-{0:06d}".encode()].HasField("rating")


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, emitter: EventEmitter | EventProcess
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; stats {emitter.stats()}")
        time.sleep(0.05)


def handled(emitter: EventEmitter) -> int:
    stats = emitter.stats()
    return stats["spooled"] + stats["shed_spool_full"]


def emit(emitter: EventEmitter, records: list[CompletedRequest]) -> None:
    for item in records:
        assert emitter.on_complete(item) is None  # never raises, never blocks on the broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    tansu = TansuBroker(free_port(), log_path=tmp_path / "tansu.log")
    with tansu:
        yield tansu


def test_every_event_arrives_exactly_once_with_its_fields(broker: TansuBroker, tmp_path: Path) -> None:
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    emitter = EventEmitter(settings)
    emitter.start()
    run = uuid.uuid4().hex[:8]
    try:
        emit(emitter, [record(i, run) for i in range(1000)])
        feedback = feedback_records(run)
        assert all(emitter.on_feedback(fb) for fb in feedback)
        wait_for(lambda: emitter.stats()["delivered"] == 1020, 30, "1020 acknowledged events", emitter)
    finally:
        emitter.close(timeout_s=10)

    kafka = settings.kafka
    received = consume(kafka, [kafka.predictions_topic, kafka.feedback_topic], 1020)
    messages = [m for m in received if m.topic == kafka.predictions_topic]
    feedback_messages = [m for m in received if m.topic == kafka.feedback_topic]
    assert len(messages) == 1000
    assert len({m.key for m in messages}) == 1000
    seen = set()
    for message in messages:
        event = events_pb2.PredictionEvent.FromString(message.value)
        assert message.key == event.prediction_id.encode()
        # The Java client's key hash (librdkafka murmur2_random, kafka-python's default): a
        # prediction id has one partition whichever client produces it.
        assert message.partition == (murmur2(message.key) & 0x7FFFFFFF) % kafka.partitions
        seen.add(check_prediction(event, run))
    assert seen == set(range(1000))

    check_feedback(feedback_messages, run)

    stats = emitter.stats()
    assert stats["emitted"] == stats["delivered"] == 1020
    assert stats["spooled"] == stats["shed"] == stats["dropped"] == 0
    emitter.on_complete(record(1000, run))  # after close: shed and counted, never raised
    assert emitter.stats()["shed_closed"] == 1


def test_events_emitted_during_a_broker_outage_are_replayed_in_order(broker: TansuBroker, tmp_path: Path) -> None:
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    emitter = EventEmitter(settings)
    emitter.start()
    run = uuid.uuid4().hex[:8]
    try:
        emit(emitter, [record(i, run) for i in range(200)])
        wait_for(lambda: emitter.stats()["delivered"] == 200, 30, "the pre-outage events", emitter)
        # Memory storage: what the broker holds now is gone after its restart, so read it first.
        before = consume(settings.kafka, [settings.kafka.predictions_topic], 200)
        assert len(before) == 200

        # SIGKILL: a crash, and quick (SIGTERM makes Tansu wait ~5 s for its connected clients).
        broker.kill()
        i = 200
        outage_ends = time.monotonic() + 10.0
        while time.monotonic() < outage_ends:  # ~50 requests/s keep finishing while Kafka is away
            emit(emitter, [record(i, run)])
            i += 1
            time.sleep(0.02)
        during_outage = i - 200
        assert emitter.stats()["spooled"] > 0

        broker.start()
        broker.wait_ready()
        after = time.monotonic() + 1.0
        while time.monotonic() < after:  # traffic goes on while the spool drains
            emit(emitter, [record(i, run)])
            i += 1
            time.sleep(0.01)
        total = i
        wait_for(
            lambda: emitter.stats()["delivered"] + emitter.stats()["replayed"] == total,
            30,
            "the spool to drain",
            emitter,
        )
    finally:
        emitter.close(timeout_s=10)

    stats = emitter.stats()
    assert stats["emitted"] == total and stats["shed"] == 0  # the queue took every record
    assert stats["spooled"] >= during_outage > 0
    assert stats["replayed"] == stats["spooled"]
    assert stats["spool_bytes"] == 0

    messages = consume(settings.kafka, [settings.kafka.predictions_topic], total - 200)
    numbers = [check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages]
    assert sorted(numbers) == list(range(200, total))  # all of them, each once
    by_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for message, number in zip(messages, numbers, strict=True):
        by_partition[message.partition].append((message.offset, number))
    for partition, entries in by_partition.items():
        in_offset_order = [number for _, number in sorted(entries)]
        assert in_offset_order == sorted(in_offset_order), f"partition {partition} out of order"


def test_an_event_the_broker_cannot_take_is_dropped_and_counted_and_the_rest_arrive(
    broker: TansuBroker, tmp_path: Path
) -> None:
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    emitter = EventEmitter(settings)
    emitter.start()
    run = uuid.uuid4().hex[:8]
    records = [record(i, run) for i in range(1, 51)]
    huge = record(0, run)  # a Generate whose prompt is larger than any produce request may be
    assert isinstance(huge.request, GenerateInput)
    huge.request = GenerateInput(model="llm", prompt="x" * (5 * 1024 * 1024), max_tokens=8, request_id="req-0")
    try:
        emit(emitter, [*records[:25], huge, *records[25:]])
        wait_for(lambda: emitter.stats()["delivered"] == 50, 30, "the 50 other events", emitter)
    finally:
        emitter.close(timeout_s=10)
    stats = emitter.stats()
    assert (stats["emitted"], stats["delivered"], stats["dropped"]) == (51, 50, 1)
    assert stats["spooled"] == stats["shed"] == 0  # a record error is not an outage
    messages = consume(settings.kafka, [settings.kafka.predictions_topic], 50)
    numbers = sorted(check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages)
    assert numbers == list(range(1, 51))


def test_close_with_a_hung_broker_returns_in_time_and_keeps_every_event(broker: TansuBroker, tmp_path: Path) -> None:
    """The broker accepts connections but never answers (SIGSTOP): close() must not wait for
    acks beyond its timeout; what was not acknowledged stays in the spool for the next process."""
    settings = settings_for(broker.bootstrap, tmp_path / "spool")
    emitter = EventEmitter(settings)
    emitter.start()
    run = uuid.uuid4().hex[:8]
    assert broker.pid is not None
    try:
        emit(emitter, [record(i, run) for i in range(10)])
        wait_for(lambda: emitter.stats()["delivered"] == 10, 30, "the first events", emitter)
        os.kill(broker.pid, signal.SIGSTOP)
        emit(emitter, [record(i, run) for i in range(10, 110)])
        time.sleep(0.2)  # the sender has handed them to librdkafka; no ack can come
        started = time.monotonic()
        emitter.close(timeout_s=1.5)  # shorter than the batch's own 2 s delivery timeout
        closed_in = time.monotonic() - started
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        emitter.close(timeout_s=3)
    stats = emitter.stats()
    assert closed_in < 1.5, f"close took {closed_in:.2f} s; stats {stats}"
    assert stats["emitted"] == 110 and stats["delivered"] == 10
    assert stats["spooled"] == 100 and stats["shed"] == stats["dropped"] == 0
    assert stats["spool_bytes"] > 0

    successor = EventEmitter(settings)  # the next process replays what close() left behind
    successor.start()
    try:
        wait_for(lambda: successor.stats()["replayed"] == 100, 30, "the replay", successor)
    finally:
        successor.close(timeout_s=5)
    messages = consume(settings.kafka, [settings.kafka.predictions_topic], 110)
    numbers = [check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages]
    # At-least-once: records in flight when the broker froze may land twice, none is missing.
    assert set(numbers) == set(range(110))


def test_full_spool_sheds_with_a_counter_and_serving_goes_on(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet: Kafka is down from the start
    settings = settings_for(
        f"127.0.0.1:{port}", tmp_path / "spool", spool_max_bytes=64 * 1024, spool_segment_bytes=16 * 1024
    )
    emitter = EventEmitter(settings)
    emitter.start()
    run = uuid.uuid4().hex[:8]
    try:
        # Not queue_depth == 0: the sender empties the queue before it spools what it took.
        emit(emitter, [record(i, run) for i in range(500)])
        wait_for(lambda: handled(emitter) == 500, 10, "the first 500 to be spooled or shed", emitter)
        first = emitter.stats()
        assert first["shed_spool_full"] > 0
        emit(emitter, [record(i, run) for i in range(500, 1000)])
        wait_for(lambda: handled(emitter) == 1000, 10, "the next 500 to be spooled or shed", emitter)
        stats = emitter.stats()
        assert stats["shed_spool_full"] > first["shed_spool_full"]  # the counter keeps growing
        assert stats["shed"] == stats["shed_spool_full"]
        assert stats["emitted"] == 1000  # the request path accepted every record
        assert stats["spooled"] + stats["shed_spool_full"] == 1000
        assert 0 < stats["spool_bytes"] <= 64 * 1024

        # The broker appears: what the spool kept is replayed; new events flow directly again.
        with TansuBroker(port, log_path=tmp_path / "tansu.log"):
            wait_for(lambda: emitter.stats()["replayed"] == stats["spooled"], 30, "the replay", emitter)
            emit(emitter, [record(i, run) for i in range(1000, 1010)])
            wait_for(lambda: emitter.stats()["delivered"] == 10, 30, "direct delivery", emitter)
            messages = consume(settings.kafka, [settings.kafka.predictions_topic], stats["spooled"] + 10)
            assert len(messages) == stats["spooled"] + 10
            emitter.close(timeout_s=5)
    finally:
        emitter.close(timeout_s=5)


CRASHING_EMITTER = """
import sys, time
from pathlib import Path
from tests.integration.test_event_emission import record, settings_for
from services.gateway.event_process import EventProcess
from services.gateway.events import EventEmitter

bootstrap, spool_dir, run, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
emitter = EventEmitter(settings_for(bootstrap, spool_dir, spool_fsync="always"))
emitter.start()
for i in range(count):
    emitter.on_complete(record(i, run))
while emitter.stats()["spooled"] < count:
    time.sleep(0.01)
print("SPOOLED", emitter.stats()["spooled"], flush=True)
time.sleep(60)  # killed here, without close()
"""


def spawn_script(script: str, args: list[str], log_path: Path) -> subprocess.Popen[str]:
    """`python -c script args...` from the repository root: stdout piped as text, stderr to log_path."""
    with log_path.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )


def test_records_left_in_the_spool_by_a_crashed_process_are_replayed(tmp_path: Path) -> None:
    port = free_port()
    spool_dir = tmp_path / "spool"
    run = uuid.uuid4().hex[:8]
    child_log = tmp_path / "child.log"
    child = spawn_script(CRASHING_EMITTER, [f"127.0.0.1:{port}", str(spool_dir), run, "300"], child_log)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.split() == ["SPOOLED", "300"], child_log.read_text()[-3000:]
    finally:
        os.kill(child.pid, signal.SIGKILL)  # a crash: no close(), no flush
        child.wait()
    assert list(spool_dir.glob("*.seg"))

    with TansuBroker(port, log_path=tmp_path / "tansu.log"):
        settings = settings_for(f"127.0.0.1:{port}", spool_dir)
        emitter = EventEmitter(settings)  # the flock died with the child: this process owns the spool
        emitter.start()
        try:
            wait_for(lambda: emitter.stats()["replayed"] == 300, 30, "the left-over spool", emitter)
        finally:
            emitter.close(timeout_s=5)
        messages = consume(settings.kafka, [settings.kafka.predictions_topic], 300)
    numbers = sorted(check_prediction(events_pb2.PredictionEvent.FromString(m.value), run) for m in messages)
    assert numbers == list(range(300))
    assert emitter.stats()["spooled"] == 0 and emitter.stats()["emitted"] == 0
    assert not list(spool_dir.glob("*.seg"))
