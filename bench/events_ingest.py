"""Analytics-plane benchmark: PredictionEvents from Kafka (real Tansu) into ClickHouse (real chdb).

    .venv/bin/python -m bench.events_ingest                 # 200k events, 15 s lag phase
    .venv/bin/python -m bench.events_ingest --events 50000 --lag-seconds 5   # quicker

Phases, on one private broker and a fresh chdb directory:
1. produce N events (90% tabular: 30 features + 2 outputs; 10% LLM with PII in the prompt);
2. baselines in the same run: kafka-python alone draining the topic (no decode, no store), and
   the consumer core's CPU work alone (decode, PII policy, row building) without Kafka/ClickHouse;
3. throughput: the logger's consumer core (EventConsumer) drains the backlog into ClickHouse
   (events/s from its first committed batch to the last; floor 50,000/s);
4. lag: events produced at a steady rate while the consumer runs; a reader thread polls
   ClickHouse every few ms, so lag = row first seen by a query - event produced (p50/p95/p99).
Prints a table and writes JSON to bench/results/events-ingest-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from services.common.api import events_pb2
from services.common.clickhouse import Client, make_client
from services.common.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from services.common.net import free_port
from services.common.tansu import TansuBroker
from services.logger import queries
from services.logger.consumer import EventConsumer, decode_prediction
from services.logger.ingest_schema import schema_file_for
from services.logger.migrate import migrate
from services.logger.pii import PiiPolicy
from services.logger.settings import LoggerSettings, RetentionSettings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THROUGHPUT_FLOOR = 50_000.0
PROMPTS = [
    "Summarise the ticket from jane.doe@example.com about card 4111 1111 1111 1111.",
    "Call me back at +1 (202) 555-0143 about my account DE89370400440532013000.",
    "Why does 10.0.0.7 time out? SSN 078-05-1120 was in the form.",
    "Write a haiku about autumn leaves.",
]


def make_event(index: int, rng: random.Random, *, experiment: str = "exp-1", started_ms: int = 0) -> bytes:
    event = events_pb2.PredictionEvent(
        schema_version=1,
        prediction_id=str(uuid.uuid4()),
        request_id=str(index),
        tenant=f"tenant-{index % 7}",
        unit_id=f"user-{index % 5000}",
        model_version="3",
        experiment=experiment,
        variant="control" if index % 2 else "treatment",
        latency_ms=rng.uniform(1, 20),
        status_code="OK",
        trace_id=uuid.uuid4().hex,
        span_id=uuid.uuid4().hex[:16],
    )
    if started_ms:
        event.started_at.FromMilliseconds(started_ms)
    else:
        event.started_at.GetCurrentTime()
    if index % 10 == 9:  # an LLM call
        event.rpc, event.model = "Generate", "llm"
        event.prompt = PROMPTS[index % len(PROMPTS)]
        event.completion = "Sure - here is a short answer without personal data."
        event.input_tokens, event.output_tokens = 24, 32
        event.time_to_first_token_ms, event.finish_reason = rng.uniform(20, 80), "stop"
        event.max_tokens, event.temperature, event.top_p, event.cost_usd = 64, 0.7, 0.9, 0.0004
    else:
        event.rpc, event.model = "Predict", "tabular-classifier"
        event.inputs.add(name="input", dtype="FP32", shape=[1, 30], values=[rng.gauss(0, 1) for _ in range(30)])
        event.outputs.add(name="probabilities", dtype="FP32", shape=[1, 2], values=[0.3, 0.7])
    return event.SerializeToString()


def produce(settings: KafkaSettings, payloads: list[bytes]) -> float:
    producer = make_producer(settings, linger_ms=20)
    started = time.perf_counter()
    for payload in payloads:
        producer.send(settings.predictions_topic, value=payload)
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return len(payloads) / elapsed


def kafka_only_rate(settings: KafkaSettings, total: int) -> float:
    """Baseline: kafka-python draining the same topic, records dropped on the floor."""
    consumer = make_consumer(settings, f"bench-raw-{uuid.uuid4().hex[:6]}", [settings.predictions_topic])
    seen, timed, first = 0, 0, 0.0
    try:
        while seen < total:
            batch = consumer.poll(timeout_ms=1000, max_records=5000)
            count = sum(len(records) for records in batch.values())
            seen += count
            if count and not first:
                first = time.perf_counter()  # the rate starts at the first batch (group join excluded)
            elif first:
                timed += count
        return timed / (time.perf_counter() - first)
    finally:
        consumer.close(autocommit=False)


def cpu_only_rate(payloads: list[bytes], policy: PiiPolicy) -> float:
    """Baseline: the consumer core's Python work per event (parse, check, PII, re-serialize,
    frame) with no Kafka and no ClickHouse."""

    @dataclass
    class _Record:
        value: bytes
        partition: int = 0
        offset: int = 0
        timestamp: int = 0

    sample = [_Record(p) for p in payloads[:50_000]]
    started = time.perf_counter()
    rows = [decode_prediction(record, policy) for record in sample]  # type: ignore[arg-type]
    block = b"".join(row.frame for row in rows)
    elapsed = time.perf_counter() - started
    assert len(rows) == len(sample) and block
    return len(sample) / elapsed


@dataclass
class ThroughputResult:
    events: int
    events_per_s: float
    wall_s_incl_join: float
    batches: int
    stored_rows: int
    distinct_rows: int


def run_consumer(
    client: Client, dsn: str, settings: KafkaSettings, policy: PiiPolicy, group: str
) -> tuple[EventConsumer, threading.Thread]:
    defaults = LoggerSettings.model_fields
    consumer = EventConsumer(
        client,
        settings,
        group,
        policy,
        batch_max_events=defaults["batch_max_events"].default,
        batch_max_wait_ms=defaults["batch_max_wait_ms"].default,
        schema_file=schema_file_for(dsn),
    )
    thread = threading.Thread(target=consumer.run, name="bench-consumer", daemon=True)
    thread.start()
    return consumer, thread


def throughput(client: Client, dsn: str, settings: KafkaSettings, policy: PiiPolicy, total: int) -> ThroughputResult:
    started = time.perf_counter()
    consumer, thread = run_consumer(client, dsn, settings, policy, "bench-logger")
    first_at, first_count = 0.0, 0
    while True:
        stats = consumer.stats()
        if stats.consumed and not first_at:
            first_at, first_count = time.perf_counter(), stats.consumed
        if stats.consumed >= total:
            done_at = time.perf_counter()
            break
        if stats.last_error and stats.failures > 3:
            raise RuntimeError(stats.last_error)
        time.sleep(0.005)
    consumer.stop()
    thread.join()
    stats = consumer.stats()
    distinct = queries.count_predictions(client)
    return ThroughputResult(
        events=total,
        events_per_s=(total - first_count) / (done_at - first_at),
        wall_s_incl_join=done_at - started,
        batches=stats.batches,
        stored_rows=stats.stored,
        distinct_rows=distinct,
    )


@dataclass
class LagResult:
    rate_per_s: float
    seconds: float
    events: int
    seen: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def lag(client: Client, dsn: str, settings: KafkaSettings, policy: PiiPolicy, rate: float, seconds: float) -> LagResult:
    """Steady-rate producer; a reader polls ClickHouse and notes when each row is first visible."""
    consumer, thread = run_consumer(client, dsn, settings, policy, "bench-logger")  # same group: resumes at the end
    consumer.wait_ready(30)
    reader = make_client(dsn, readonly=True)
    produced: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def read_loop() -> None:
        # Until every produced event was seen (or 15 s after the producer stopped).
        while not (stop.is_set() and (len(seen) >= len(produced) or time.perf_counter() - stopped_at[0] > 15)):
            rows = reader.query(
                "SELECT request_id FROM predictions WHERE experiment = 'lag-probe' "
                "AND ingested_at >= now64(3) - INTERVAL 10 SECOND"
            ).result_rows
            now = time.perf_counter()
            for (request_id,) in rows:
                seen.setdefault(request_id, now)
            time.sleep(0.005)

    stopped_at = [0.0]
    reader_thread = threading.Thread(target=read_loop, name="bench-reader", daemon=True)
    # Wait for the group join (first poll) so the lag window measures steady state only.
    time.sleep(4.0)
    reader_thread.start()
    producer = make_producer(settings)
    rng = random.Random(7)
    total = int(rate * seconds)
    begin = time.perf_counter()
    for index in range(total):
        due = begin + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        payload = make_event(index, rng, experiment="lag-probe", started_ms=int(time.time() * 1000))
        produced[str(index)] = time.perf_counter()
        producer.send(settings.predictions_topic, value=payload)
    producer.flush()
    stopped_at[0] = time.perf_counter()
    stop.set()
    reader_thread.join()
    producer.close()
    consumer.stop()
    thread.join()
    reader.close()
    lags = np.array([(seen[k] - produced[k]) * 1000 for k in produced if k in seen])
    p50, p95, p99 = np.percentile(lags, [50, 95, 99]) if lags.size else (float("nan"),) * 3
    return LagResult(rate, seconds, total, int(lags.size), float(p50), float(p95), float(p99), float(lags.max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--lag-rate", type=float, default=2000.0, help="events/s during the lag phase")
    parser.add_argument("--lag-seconds", type=float, default=15.0)
    args = parser.parse_args()
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-ingest-"))
    policy = PiiPolicy(salt=b"bench-salt")
    record: dict[str, Any] = {
        "benchmark": "events_ingest",
        "started_at": datetime.now(UTC).isoformat(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
    }
    with TansuBroker(free_port(), log_path=workdir / "tansu.log") as broker:
        settings = KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            predictions_topic="bench.predictions",
            feedback_topic="bench.feedback",
            alerts_topic="bench.alerts",
            deadletter_topic="bench.deadletter",
        )
        ensure_topics(settings)
        rng = random.Random(42)
        console.print(f"generating {args.events:,} events ...")
        payloads = [make_event(i, rng) for i in range(args.events)]
        console.print("producing into Tansu ...")
        produce_rate = produce(settings, payloads)
        console.print(f"  produced at {produce_rate:,.0f} events/s (kafka-python, one process)")
        raw_rate = kafka_only_rate(settings, args.events)
        cpu_rate = cpu_only_rate(payloads, policy)
        dsn = f"chdb://{workdir / 'clickhouse'}"
        client = make_client(dsn)
        migrate(client, RetentionSettings())
        console.print("draining into ClickHouse through the consumer core ...")
        result = throughput(client, dsn, settings, policy, args.events)
        console.print(f"lag phase: {args.lag_rate:,.0f} events/s for {args.lag_seconds:.0f} s ...")
        lag_result = lag(client, dsn, settings, policy, args.lag_rate, args.lag_seconds)
        client.close()

    table = Table(title=f"Kafka (Tansu) -> ClickHouse (chdb), {args.events:,} PredictionEvents")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("produce (setup)", f"{produce_rate:,.0f}/s", "kafka-python producer, acks=all")
    table.add_row("baseline: kafka-python only", f"{raw_rate:,.0f}/s", "poll + drop, no decode/store")
    table.add_row("baseline: check+PII+frame only", f"{cpu_rate:,.0f}/s", "consumer core's Python work, no I/O")
    ok = result.events_per_s >= THROUGHPUT_FLOOR
    table.add_row(
        "consumer core -> ClickHouse",
        f"[{'green' if ok else 'red'}]{result.events_per_s:,.0f}/s[/]",
        f"floor {THROUGHPUT_FLOOR:,.0f}/s; {result.batches} batches; {result.wall_s_incl_join:.1f} s incl. group join",
    )
    table.add_row("rows stored / distinct", f"{result.stored_rows:,} / {result.distinct_rows:,}", "distinct via FINAL")
    table.add_row(
        f"lag p50 / p95 / p99 @ {lag_result.rate_per_s:,.0f}/s",
        f"{lag_result.p50_ms:.0f} / {lag_result.p95_ms:.0f} / {lag_result.p99_ms:.0f} ms",
        f"produced -> seen by a query; {lag_result.seen:,}/{lag_result.events:,}, max {lag_result.max_ms:.0f} ms",
    )
    console.print(table)
    record.update(
        {
            "produce_events_per_s": produce_rate,
            "baseline_kafka_only_events_per_s": raw_rate,
            "baseline_cpu_only_events_per_s": cpu_rate,
            "throughput": asdict(result),
            "throughput_floor_events_per_s": THROUGHPUT_FLOOR,
            "throughput_floor_met": ok,
            "lag": asdict(lag_result),
        }
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"events-ingest-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    console.print(f"results: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
