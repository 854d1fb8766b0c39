"""The logger against the REAL Tansu broker and REAL chdb: exactly-once counts, redelivery, SIGKILL
and restart, dead letters, PII, right-to-delete, feedback joins, downstream consumers, the API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from services.common.api import events_pb2, logger_pb2, logger_pb2_grpc
from services.common.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from services.common.net import free_port
from services.common.settings import REPO_ROOT
from services.common.tansu import TansuBroker
from services.logger import queries
from services.logger.app import LoggerApp, start_logger
from services.logger.pii import keyed_hash
from services.logger.settings import LoggerSettings

pytestmark = pytest.mark.integration

SALT = "integration-test-salt"
TIMEOUT_S = 20.0


def topic_settings(bootstrap: str) -> KafkaSettings:
    run = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        predictions_topic=f"t{run}.predictions",
        feedback_topic=f"t{run}.feedback",
        alerts_topic=f"t{run}.alerts",
        deadletter_topic=f"t{run}.deadletter",
    )


def prediction(
    model: str,
    *,
    unit_id: str = "user-1",
    version: str = "1",
    prompt: str = "",
    completion: str = "",
    error: str = "",
    prediction_id: str | None = None,
) -> events_pb2.PredictionEvent:
    event = events_pb2.PredictionEvent(
        schema_version=1,
        prediction_id=prediction_id or str(uuid.uuid4()),
        request_id=str(uuid.uuid4()),
        tenant="acme",
        unit_id=unit_id,
        rpc="Generate" if prompt else "Predict",
        model=model,
        model_version=version,
        experiment="exp",
        variant="control",
        latency_ms=3.5,
        status_code="OK" if not error else "INTERNAL",
        error_message=error,
        prompt=prompt,
        completion=completion,
        trace_id=uuid.uuid4().hex,
    )
    event.started_at.GetCurrentTime()
    if not prompt:
        event.inputs.add(name="input", dtype="FP32", shape=[1, 3], values=[0.1, 0.2, 0.3])
        event.outputs.add(name="probabilities", dtype="FP32", shape=[1, 2], values=[0.4, 0.6])
    return event


def feedback(prediction_id: str, *, unit_id: str = "", label: str = "1", text: str = "") -> events_pb2.FeedbackEvent:
    event = events_pb2.FeedbackEvent(
        schema_version=1,
        feedback_id=str(uuid.uuid4()),
        prediction_id=prediction_id,
        tenant="acme",
        unit_id=unit_id,
        label=label,
        rating=4.0,
        text=text,
    )
    event.created_at.GetCurrentTime()
    return event


def send_all(producer: KafkaProducer, topic: str, events: list[Any]) -> list[Any]:
    """Sends (key = the event id) and waits for every ack; returns the record metadata."""
    futures = []
    for event in events:
        key = event.prediction_id if isinstance(event, events_pb2.PredictionEvent) else event.feedback_id
        futures.append(producer.send(topic, key=key.encode(), value=event.SerializeToString()))
    producer.flush()
    return [future.get(timeout=10) for future in futures]


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    """Polls a blocking check (in a thread) until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class LoggerEnv:
    app: LoggerApp
    kafka: KafkaSettings
    producer: KafkaProducer
    stub: logger_pb2_grpc.LoggerStub

    def count(self, model: str) -> int:
        return queries.count_predictions(self.app.client, model=model)

    async def drained(self) -> None:
        """Waits until the consumer has stored and committed everything produced so far."""

        def done() -> bool:
            stats, consuming = self.app.stats()
            return consuming and bool(stats.partitions) and stats.lag == 0 and stats.in_flight == 0

        await eventually(done, "the consumer to catch up")


@pytest.fixture(scope="module")
async def env(kafka_broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LoggerEnv]:
    kafka = topic_settings(kafka_broker.bootstrap)
    settings = LoggerSettings(
        port=free_port(),
        kafka=kafka,
        clickhouse_dsn=f"chdb://{tmp_path_factory.mktemp('logger') / 'clickhouse'}",
        group_id=f"logger-{uuid.uuid4().hex[:6]}",
        batch_max_wait_ms=50,
        pii_hash_salt=SALT,
    )
    app = await start_logger(settings)
    producer = await asyncio.to_thread(make_producer, kafka)
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield LoggerEnv(app, kafka, producer, logger_pb2_grpc.LoggerStub(channel))
    finally:
        await channel.close()
        await asyncio.to_thread(producer.close)
        await app.stop()


async def test_thousand_events_land_exactly_once(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    events = [prediction(model, unit_id=f"user-{i % 17}") for i in range(1000)]
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, events)
    await eventually(lambda: env.count(model) >= 1000, "1000 predictions")
    await env.drained()
    assert await asyncio.to_thread(env.count, model) == 1000
    stored = await asyncio.to_thread(
        lambda: env.app.client.query(
            "SELECT uniqExact(prediction_id), any(length(input_names)), any(input_names[2]) FROM predictions "
            "WHERE model = {m:String}",
            parameters={"m": model},
        ).result_rows[0]
    )
    assert stored == (1000, 3, "input[1]")


async def test_redelivery_does_not_double_count(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    events = [prediction(model) for _ in range(200)]
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, events)
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, events)  # same ids again
    await eventually(lambda: env.count(model) >= 200, "200 predictions")
    await env.drained()
    assert await asyncio.to_thread(env.count, model) == 200
    # And through the operator API (FINAL in the SQL, as the canonical queries do).
    reply = await env.stub.Query(
        logger_pb2.QueryRequest(sql=f"SELECT count() FROM predictions FINAL WHERE model = '{model}'")
    )
    assert json.loads(reply.rows[0]) == [200]


async def test_garbage_goes_to_dead_letter_and_consumer_keeps_going(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    wrong_schema = prediction(model)
    wrong_schema.schema_version = 2
    no_id = prediction(model)
    no_id.prediction_id = ""
    bad = [
        (b"\xff\xfe not a protobuf", "undecodable"),
        (wrong_schema.SerializeToString(), "unsupported_schema_version"),
        (no_id.SerializeToString(), "invalid"),
    ]
    good = prediction(model)

    def produce() -> list[Any]:
        futures = [env.producer.send(env.kafka.predictions_topic, key=b"same-key", value=v) for v, _ in bad]
        futures.append(env.producer.send(env.kafka.predictions_topic, key=b"same-key", value=good.SerializeToString()))
        env.producer.flush()
        return [f.get(timeout=10) for f in futures]

    metadata = await asyncio.to_thread(produce)
    await eventually(lambda: env.count(model) == 1, "the good event after the garbage")

    def dead_letters() -> list[Any]:
        consumer = make_consumer(env.kafka, f"dlq-reader-{uuid.uuid4().hex[:6]}", [env.kafka.deadletter_topic])
        found: list[Any] = []
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while len(found) < len(bad) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    found.extend(r for r in records if r.key == b"same-key")
        finally:
            consumer.close(autocommit=False)
        return found

    letters = await asyncio.to_thread(dead_letters)
    assert len(letters) == len(bad)
    by_offset = {int(dict(r.headers)["source_offset"]): r for r in letters}
    for (value, reason), meta in zip(bad, metadata[: len(bad)], strict=True):
        letter = by_offset[meta.offset]
        headers = dict(letter.headers)
        assert headers["reason"].decode() == reason
        assert headers["source_topic"].decode() == env.kafka.predictions_topic
        assert int(headers["source_partition"]) == meta.partition
        assert letter.value == value  # the original bytes, for replay after a fix
    stats, _ = env.app.stats()
    assert stats.dead_lettered >= len(bad)


PII_PROBES = {
    "email": "jane.doe@example.com",
    "phone": "+1 (202) 555-0143",
    "card": "4111 1111 1111 1111",
    "card_digits": "4111111111111111",
    "ssn": "078-05-1120",
    "iban": "DE89370400440532013000",
    "ipv4": "192.168.13.37",
    "ipv6": "2001:db8::dead:beef",
}


async def test_pii_never_stored_raw(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    text = (
        f"Hi, I'm {PII_PROBES['email']}, call {PII_PROBES['phone']}. Card {PII_PROBES['card']} "
        f"(also {PII_PROBES['card_digits']}), SSN {PII_PROBES['ssn']}, IBAN {PII_PROBES['iban']}, "
        f"from {PII_PROBES['ipv4']} and {PII_PROBES['ipv6']}."
    )
    event = prediction(model, prompt=text, completion=f"Noted, {PII_PROBES['email']}.", error=text)
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, [event])
    await asyncio.to_thread(
        send_all, env.producer, env.kafka.feedback_topic, [feedback(event.prediction_id, text=text)]
    )
    await eventually(lambda: queries.count_feedback(env.app.client, prediction_id=event.prediction_id) == 1, "feedback")
    await eventually(lambda: env.count(model) == 1, "the prediction")

    def scan() -> dict[str, int]:
        client = env.app.client
        columns = client.query(
            "SELECT table, name FROM system.columns WHERE database = currentDatabase() AND type LIKE '%String%'"
        ).result_rows
        hits: dict[str, int] = {}
        for table, column in columns:
            for name, probe in PII_PROBES.items():
                count = client.query(
                    f"SELECT count() FROM `{table}` WHERE positionCaseInsensitive(toString(`{column}`), {{p:String}}) > 0",
                    parameters={"p": probe},
                ).result_rows[0][0]
                if count:
                    hits[f"{table}.{column}:{name}"] = count
        return hits

    assert await asyncio.to_thread(scan) == {}
    stored = await asyncio.to_thread(
        lambda: env.app.client.query(
            "SELECT prompt FROM predictions WHERE prediction_id = {id:String}", parameters={"id": event.prediction_id}
        ).result_rows[0][0]
    )
    for placeholder in ("[EMAIL]", "[PHONE]", "[CARD]", "[SSN]", "[IBAN]", "[IP]"):
        assert placeholder in stored


async def test_delete_user_everywhere_and_audited(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    victim, other = f"victim-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    victim_predictions = [prediction(model, unit_id=victim) for _ in range(5)]
    other_predictions = [prediction(model, unit_id=other) for _ in range(3)]
    feedbacks = [
        feedback(victim_predictions[0].prediction_id, unit_id=victim),
        feedback(victim_predictions[1].prediction_id),  # no unit id: found through the prediction
        feedback(other_predictions[0].prediction_id, unit_id=other),
    ]
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, victim_predictions + other_predictions)
    await asyncio.to_thread(send_all, env.producer, env.kafka.feedback_topic, feedbacks)
    await eventually(lambda: env.count(model) == 8, "8 predictions")
    await eventually(
        lambda: sum(queries.count_feedback(env.app.client, prediction_id=f.prediction_id) for f in feedbacks) == 3,
        "3 feedbacks",
    )

    reply = await env.stub.DeleteUser(
        logger_pb2.DeleteUserRequest(unit_id=victim, requested_by="dpo@acme", reason="GDPR art. 17 ticket 42")
    )
    assert reply.verified
    assert {t.table: (t.rows_removed, t.rows_remaining) for t in reply.tables} == {
        "predictions": (5, 0),
        "feedback": (2, 0),
    }

    def remaining() -> dict[str, int]:
        return queries.rows_for_unit(env.app.client, victim) | {
            "feedback_by_prediction": queries.count_feedback(
                env.app.client, prediction_id=victim_predictions[1].prediction_id
            ),
            "other_predictions": queries.count_predictions(env.app.client, unit_id=other),
            "other_feedback": queries.count_feedback(env.app.client, unit_id=other),
        }

    assert await asyncio.to_thread(remaining) == {
        "predictions": 0,
        "feedback": 0,
        "feedback_by_prediction": 0,
        "other_predictions": 3,
        "other_feedback": 1,
    }
    audit = await asyncio.to_thread(
        lambda: (
            env.app.client.query(
                "SELECT requested_by, reason, rows_removed, verified, subject_key FROM privacy_audit "
                "WHERE audit_id = {id:String}",
                parameters={"id": reply.audit_id},
            ).result_rows
        )
    )
    assert audit == [
        (
            "dpo@acme",
            "GDPR art. 17 ticket 42",
            {"predictions": 5, "feedback": 2},
            True,
            keyed_hash(victim, SALT.encode()),
        )
    ]
    # The erased user's id is nowhere: not in the audit, not in the mutation log.
    leftovers = await asyncio.to_thread(
        lambda: env.app.client.query(
            "SELECT count() FROM system.mutations WHERE position(command, {u:String}) > 0", parameters={"u": victim}
        ).result_rows[0][0]
    )
    assert leftovers == 0

    # A replay of the user's old events (Kafka keeps them) must not bring the rows back.
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, victim_predictions[:2])
    marker = prediction(model, unit_id=other)
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, [marker])
    await eventually(lambda: queries.count_predictions(env.app.client, unit_id=other) == 4, "the marker event")
    assert await asyncio.to_thread(queries.rows_for_unit, env.app.client, victim) == {"predictions": 0, "feedback": 0}
    await eventually(lambda: env.app.stats()[0].dropped_erased >= 2, "the replayed events to be dropped")


async def test_feedback_joins_its_prediction(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    served = [prediction(model, version="1"), prediction(model, version="2"), prediction(model, version="2")]
    labels = ["0", "1", "1"]
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, served)
    await asyncio.to_thread(
        send_all,
        env.producer,
        env.kafka.feedback_topic,
        [feedback(p.prediction_id, label=label) for p, label in zip(served, labels, strict=True)],
    )
    await eventually(lambda: len(queries.labeled_predictions(env.app.client, model=model)) == 3, "3 joined rows")
    joined = await asyncio.to_thread(queries.labeled_predictions, env.app.client, model=model)
    assert sorted((row.prediction_id, row.model_version, row.label) for row in joined) == sorted(
        (p.prediction_id, p.model_version, label) for p, label in zip(served, labels, strict=True)
    )
    reply = await env.stub.Query(
        logger_pb2.QueryRequest(
            sql="SELECT p.model_version, countIf(f.label = '1') AS positives, count() AS n "
            "FROM feedback AS f FINAL JOIN predictions AS p FINAL ON f.prediction_id = p.prediction_id "
            f"WHERE p.model = '{model}' GROUP BY p.model_version ORDER BY p.model_version"
        )
    )
    assert [c.name for c in reply.columns] == ["model_version", "positives", "n"]
    assert [json.loads(row) for row in reply.rows] == [["1", 0, 1], ["2", 2, 2]]


async def test_downstream_team_decodes_events_with_the_protos(env: LoggerEnv) -> None:
    model = f"m-{uuid.uuid4().hex[:6]}"
    events = [prediction(model, version="7") for _ in range(20)]
    await asyncio.to_thread(send_all, env.producer, env.kafka.predictions_topic, events)

    def read() -> dict[str, events_pb2.PredictionEvent]:
        consumer = make_consumer(env.kafka, f"downstream-{uuid.uuid4().hex[:6]}", [env.kafka.predictions_topic])
        seen: dict[str, events_pb2.PredictionEvent] = {}
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while len(seen) < len(events) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        try:
                            event = events_pb2.PredictionEvent.FromString(record.value)
                        except Exception:
                            continue  # the garbage test's bytes: a real consumer dead-letters them
                        if event.schema_version == 1 and event.model == model:
                            assert record.key.decode() == event.prediction_id
                            seen[event.prediction_id] = event
        finally:
            consumer.close(autocommit=False)
        return seen

    seen = await asyncio.to_thread(read)
    assert set(seen) == {e.prediction_id for e in events}
    assert all(e.model_version == "7" and list(e.inputs[0].values) == [0.1, 0.2, 0.3] for e in seen.values())


async def test_query_api_is_read_only(env: LoggerEnv) -> None:
    for sql in (
        "INSERT INTO predictions (prediction_id) VALUES ('x')",
        "DROP TABLE predictions",
        "SELECT 1; DROP TABLE predictions",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT file('/etc/hostname')",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "SELECT 1 SETTINGS readonly = 0",
        "ALTER TABLE predictions DELETE WHERE 1",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.stub.Query(logger_pb2.QueryRequest(sql=sql))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sql
    reply = await env.stub.Query(
        logger_pb2.QueryRequest(sql="WITH 3 AS k SELECT number, toDateTime64(0, 3, 'UTC') FROM numbers(10)", max_rows=4)
    )
    assert reply.truncated and len(reply.rows) == 4
    assert json.loads(reply.rows[1]) == [1, "1970-01-01T00:00:00Z"]
    stats = await env.stub.Stats(logger_pb2.StatsRequest())
    assert stats.consuming and stats.consumed > 0 and stats.stored > 0


# ---- the logger as its own process: SIGKILL mid-stream, restart -----------------------------


class LoggerProcess:
    def __init__(self, kafka: KafkaSettings, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "logger.log"
        self.env = {
            **os.environ,
            "MLMESH_LOGGER_PORT": str(self.port),
            "MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "MLMESH_LOGGER_KAFKA__PREDICTIONS_TOPIC": kafka.predictions_topic,
            "MLMESH_LOGGER_KAFKA__FEEDBACK_TOPIC": kafka.feedback_topic,
            "MLMESH_LOGGER_KAFKA__ALERTS_TOPIC": kafka.alerts_topic,
            "MLMESH_LOGGER_KAFKA__DEADLETTER_TOPIC": kafka.deadletter_topic,
            "MLMESH_LOGGER_CLICKHOUSE_DSN": f"chdb://{workdir / 'clickhouse'}",
            "MLMESH_LOGGER_GROUP_ID": f"logger-{uuid.uuid4().hex[:6]}",
            "MLMESH_LOGGER_PII_HASH_SALT": SALT,
            # Batches closed by time: a batch's commit waits for the next batch to be read (~0.5 s),
            # so at almost any moment one batch is stored but not committed: where a kill hurts.
            "MLMESH_LOGGER_BATCH_MAX_EVENTS": "100000",
            "MLMESH_LOGGER_BATCH_MAX_WAIT_MS": "500",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.logger"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: signal.Signals) -> int:
        assert self.process is not None
        os.killpg(self.process.pid, signum)
        return self.process.wait(timeout=30)

    def kill_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def logger_process(kafka_broker: TansuBroker, tmp_path: Path) -> Iterator[LoggerProcess]:
    kafka = topic_settings(kafka_broker.bootstrap)
    ensure_topics(kafka)
    process = LoggerProcess(kafka, tmp_path)
    try:
        yield process
    finally:
        process.kill_if_running()


async def _stub_ready(port: int) -> tuple[grpc.aio.Channel, logger_pb2_grpc.LoggerStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = logger_pb2_grpc.LoggerStub(channel)
    deadline = time.monotonic() + 30
    while True:
        try:
            stats = await stub.Stats(logger_pb2.StatsRequest(), timeout=2)
            if stats.consuming:
                return channel, stub
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def _count(stub: logger_pb2_grpc.LoggerStub, model: str) -> tuple[int, int]:
    reply = await stub.Query(
        logger_pb2.QueryRequest(
            sql=f"SELECT (SELECT count() FROM predictions FINAL WHERE model = '{model}'), "
            f"(SELECT count() FROM predictions WHERE model = '{model}')"
        )
    )
    distinct, physical = json.loads(reply.rows[0])
    return distinct, physical


async def test_sigkill_mid_stream_then_restart_loses_nothing_and_counts_once(logger_process: LoggerProcess) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=logger_process.env["MLMESH_LOGGER_KAFKA__BOOTSTRAP_SERVERS"],
        predictions_topic=logger_process.env["MLMESH_LOGGER_KAFKA__PREDICTIONS_TOPIC"],
    )
    group = logger_process.env["MLMESH_LOGGER_GROUP_ID"]
    model = f"m-{uuid.uuid4().hex[:6]}"
    total = 5000
    logger_process.start()
    channel, stub = await _stub_ready(logger_process.port)

    producer = await asyncio.to_thread(make_producer, kafka)
    admin = await asyncio.to_thread(KafkaAdminClient, bootstrap_servers=kafka.bootstrap_servers)
    # Warm-up first: the group join takes a few seconds, the kill must hit a running stream.
    warmup = [prediction(model) for _ in range(100)]
    await asyncio.to_thread(send_all, producer, kafka.predictions_topic, warmup)
    await _wait_for(lambda: _count(stub, model), lambda c: c[0] >= len(warmup), "the warm-up events")
    produced = threading.Event()

    def produce_steadily() -> None:
        for _ in range((total - len(warmup)) // 20):  # a continuous ~1,000 events/s for ~5 s
            for event in [prediction(model) for _ in range(20)]:
                producer.send(
                    kafka.predictions_topic, key=event.prediction_id.encode(), value=event.SerializeToString()
                )
            time.sleep(0.02)
        producer.flush()
        produced.set()

    async def stored_and_committed() -> tuple[int, int]:
        stored, _ = await _count(stub, model)
        return stored, await asyncio.to_thread(_committed_records, admin, kafka.predictions_topic, group)

    writer = threading.Thread(target=produce_steadily)
    writer.start()
    try:
        # Kill while a batch is stored but not committed yet: it must be read again, once.
        await _wait_for(stored_and_committed, lambda sc: sc[0] >= 600 and sc[0] > sc[1], "a stored, uncommitted batch")
        assert not produced.is_set(), "the producer finished before the kill: make the stream longer"
        await channel.close()
        assert logger_process.signal(signal.SIGKILL) == -signal.SIGKILL
        killed_at = time.monotonic()
        committed = await asyncio.to_thread(_committed_records, admin, kafka.predictions_topic, group)

        logger_process.start()  # same store, same group: resumes from the last commit
        channel, stub = await _stub_ready(logger_process.port)
        # The new member waits for the dead one's session to expire before it reads anything,
        # so the store still shows what the killed process left behind.
        before = await stub.Stats(logger_pb2.StatsRequest())
        stored_at_kill, _ = await _count(stub, model)
        after = await stub.Stats(logger_pb2.StatsRequest())
        assert before.consumed == after.consumed == 0 and after.in_flight == 0, "the restarted logger was too quick"
        assert stored_at_kill > committed, (stored_at_kill, committed)  # so redelivery really happens

        await _wait_for(lambda: _count(stub, model), lambda c: c[0] >= total, "all events")
        await asyncio.sleep(0.5)  # nothing more may arrive
        distinct, physical = await _count(stub, model)
        assert distinct == total, logger_process.log_tail()
        assert physical >= total  # redelivered rows stay apart until merged; FINAL counts them once
        assert time.monotonic() - killed_at < 60
    finally:
        await asyncio.to_thread(writer.join)
        await asyncio.to_thread(producer.close)
        await asyncio.to_thread(admin.close)
        await channel.close()
    # A graceful stop: SIGTERM finishes the batch in flight and exits 0.
    assert logger_process.signal(signal.SIGTERM) == 0, logger_process.log_tail()


def _committed_records(admin: KafkaAdminClient, topic: str, group_id: str) -> int:
    """Records the group has committed on `topic` (this test's own topic: offsets = records)."""
    offsets = admin.list_group_offsets(group_id).get(group_id, {})
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def _wait_for(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], what: str, timeout_s: float = 45.0
) -> Any:
    deadline = time.monotonic() + timeout_s
    value: Any = None
    while time.monotonic() < deadline:
        value = await probe()
        if done(value):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
