"""Event emission: every finished request and every feedback becomes a protobuf event on Kafka.

The request path only appends the in-memory record to a bounded queue (never waits, never
converts). One background thread converts and serializes each batch and hands it to librdkafka
(confluent-kafka), which batches, compresses and talks to the broker in its own C threads,
outside the GIL, with acks=all and idempotence. What the broker does not acknowledge (a delivery
report with an error, an outage, the batch's time running out) goes to the on-disk spool and is
replayed, in order, once it is back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from google.protobuf import timestamp_pb2

from services.common.domain import GenerateInput, PredictInput, TensorData
from services.common.gen.mlmesh.v1 import events_pb2
from services.common.kafka import ensure_topics, make_confluent_producer
from services.gateway.events_settings import EventSettings
from services.gateway.hooks import CompletedRequest, FeedbackRecord, GatewayHook
from services.gateway.spool import Spool, SpoolFull, SpoolRecord

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# KServe v2 dtypes as struct codes (tensors travel as raw little-endian bytes: "<" below).
# struct, not numpy: for the few hundred values captured it is ~3x cheaper per tensor, and
# this runs on the sender thread, under the GIL of the process that serves.
_STRUCT_CODES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_ITEM_SIZES = {name: struct.calcsize("<" + code) for name, code in _STRUCT_CODES.items()}
_UNPACKERS: dict[tuple[str, int], Callable[[Any], tuple[Any, ...]]] = {}  # (code, count) -> unpack_from
_UNPACKERS_MAX = 4096

# The broker (or librdkafka, before sending) rejects these records themselves; retrying or
# spooling them would never succeed.
_RECORD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
        KafkaError.INVALID_MSG_SIZE,
    }
)
# Producer-level errors after which the producer is dropped and the broker probed again: every
# broker connection is gone (a restarted in-memory broker also forgot our producer id and our
# topics), or librdkafka gave up on the idempotent producer (fatal).
_BROKER_DOWN_ERRORS = frozenset({KafkaError._ALL_BROKERS_DOWN})

PREDICTION = 0  # kinds of queued record
FEEDBACK = 1
WAKE = (-1, None)  # queue item that only wakes the sender (close)


# -- pure conversion --


def tensor_values(tensor: TensorData, capture_max_values: int) -> events_pb2.TensorValues:
    """Name, dtype, shape and the first capture_max_values values as float64 (none for BYTES)."""
    summary = events_pb2.TensorValues()
    _fill_tensor_values(summary, tensor, capture_max_values)
    return summary


def _fill_tensor_values(summary: events_pb2.TensorValues, tensor: TensorData, capture_max_values: int) -> None:
    """tensor_values() into a message already in place (event.inputs.add(): no copy)."""
    summary.name = tensor.name
    summary.dtype = tensor.dtype
    summary.shape.extend(tensor.shape)
    code = _STRUCT_CODES.get(tensor.dtype)
    if code is None:  # BYTES (or an unknown dtype on a rejected request): shape only
        return
    total = math.prod(max(dim, 0) for dim in tensor.shape)
    # Decode only the captured prefix, and never past the data a rejected request really sent.
    count = max(0, min(total, capture_max_values, len(tensor.data) // _ITEM_SIZES[tensor.dtype]))
    if count:
        unpack = _UNPACKERS.get((code, count))
        if unpack is None:
            unpack = struct.Struct(f"<{count}{code}").unpack_from
            if len(_UNPACKERS) < _UNPACKERS_MAX:
                _UNPACKERS[code, count] = unpack
        summary.values.extend(unpack(tensor.data))  # ints, floats, bools: stored as float64
    summary.truncated = count < total


def _set_time(stamp: timestamp_pb2.Timestamp, unix_s: float) -> None:
    # Split before scaling: unix_s * 1e9 does not fit a double's 53 bits exactly.
    seconds = math.floor(unix_s)
    nanos = min(round((unix_s - seconds) * 1e9), 999_999_999)
    stamp.seconds, stamp.nanos = seconds, nanos


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def prediction_event(record: CompletedRequest, capture_max_values: int) -> events_pb2.PredictionEvent:
    request = record.request
    served = record.served_by
    event = events_pb2.PredictionEvent(
        schema_version=SCHEMA_VERSION,
        prediction_id=record.prediction_id,
        request_id=request.request_id,
        tenant=record.tenant,
        unit_id=request.unit_id,
        rpc=record.rpc,
        model=served.model if served else request.model,
        model_version=served.model_version if served else "",
        experiment=served.experiment if served else "",
        variant=served.variant if served else "",
        latency_ms=record.latency_ms,
        status_code=record.status,
        error_message=record.error,
        trace_id=record.trace_id,
    )
    extra = record.extra
    if extra:  # not on CompletedRequest itself: the router/hooks may pass them through `extra`
        event.shadow = _flag(extra.get("shadow"))
        event.span_id = extra.get("span_id", "")
        with contextlib.suppress(ValueError):
            event.cost_usd = float(extra.get("cost_usd", 0.0))
    _set_time(event.started_at, record.started_at_unix)
    if isinstance(request, PredictInput):
        for tensor in request.inputs:
            _fill_tensor_values(event.inputs.add(), tensor, capture_max_values)
        if record.result is not None:
            for tensor in record.result.outputs:
                _fill_tensor_values(event.outputs.add(), tensor, capture_max_values)
    elif isinstance(request, GenerateInput):
        event.prompt = request.prompt
        event.completion = record.completion_text
        event.finish_reason = record.finish_reason
        event.max_tokens = request.max_tokens
        event.temperature = request.temperature
        event.top_p = request.top_p
        if record.usage is not None:
            event.input_tokens = record.usage.input_tokens
            event.output_tokens = record.usage.output_tokens
            event.time_to_first_token_ms = record.usage.time_to_first_token_ms
    return event


def feedback_event(fb: FeedbackRecord) -> events_pb2.FeedbackEvent:
    event = events_pb2.FeedbackEvent(
        schema_version=SCHEMA_VERSION,
        feedback_id=fb.feedback_id,
        prediction_id=fb.prediction_id,
        tenant=fb.tenant,
        unit_id=fb.unit_id,
        label=fb.label,
        outcome=fb.outcome,
        text=fb.text,
        trace_id=fb.trace_id,
    )
    if fb.rating is not None:  # optional field: absent means "no rating", not 0
        event.rating = fb.rating
    _set_time(event.created_at, fb.created_at_unix)
    return event


# -- emitter --


def producer_config(settings: EventSettings) -> dict[str, Any]:
    """The emitter's librdkafka properties on top of make_confluent_producer's (acks=all,
    idempotence, murmur2 partitioner)."""
    return {
        "compression.type": settings.compression,
        # The sender waits for each batch's reports and, after delivery_timeout_s, purges what
        # is left and spools it. librdkafka's own per-message timeout is only a backstop, 1 s
        # later, so it never expires a message first: an expired message leaves a gap that
        # later messages of its partition would fill before the spool replays it.
        "message.timeout.ms": int(settings.delivery_timeout_s * 1000) + 1000,
        # The local queue holds one batch at a time; bounded by count and size all the same.
        "queue.buffering.max.messages": max(100_000, settings.batch_max_events),
        "queue.buffering.max.kbytes": 64 * 1024,
        "reconnect.backoff.max.ms": 1000,
        # A report per failed record only (see _Reports); success = flushed without a report.
        "delivery.report.only.error": True,
    }


class _BrokerDown(Exception):
    """A produce batch was not fully acknowledged (timeout, connection loss, broker error)."""


class _Reports:
    """Failed-delivery reports of one batch, by position (served by poll/flush on the sender
    thread). Only failures are reported (delivery.report.only.error): a Python callback per
    acknowledged record would take the GIL once per event, from under the serving loop."""

    __slots__ = ("errors",)

    def __init__(self, size: int) -> None:
        self.errors: list[KafkaError | None] = [None] * size

    def store(self, position: int, error: KafkaError | None, _message: Any) -> None:
        self.errors[position] = error


class QueuedEventHook(GatewayHook):
    """The request-path half of both emitters (EventEmitter here, EventProcess in a child
    process): records go on a bounded queue that a background thread drains. O(1), no I/O, no
    conversion; a full queue or a closed hook sheds and counts."""

    accepts_feedback = True

    def __init__(self, settings: EventSettings) -> None:
        self.settings = settings
        # SimpleQueue: a C put with no lock dance; the bound is checked with qsize (racy by a
        # few items under concurrent callers, which is fine for a shed threshold).
        self._queue: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._queue_max = settings.queue_max_events
        self._linger_s = settings.linger_ms / 1000
        self._closing = False
        self._stop = threading.Event()  # set by close(): the draining thread finishes up
        # Written on the request path only (one thread), so no lock is needed.
        self._emitted = 0
        self._shed_queue_full = 0
        self._shed_closed = 0

    def _offer(self, kind: int, item: CompletedRequest | FeedbackRecord) -> bool:
        if self._closing:
            self._shed_closed += 1
            return False
        if self._queue.qsize() >= self._queue_max:
            self._shed_queue_full += 1
            return False
        self._queue.put((kind, item))
        self._emitted += 1
        return True

    def on_complete(self, record: CompletedRequest) -> None:
        self._offer(PREDICTION, record)

    def on_feedback(self, feedback: FeedbackRecord) -> bool:
        return self._offer(FEEDBACK, feedback)

    # -- the draining thread's side --

    def _take(self, wait_s: float) -> list[tuple[int, Any]]:
        items: list[tuple[int, Any]] = []
        try:
            items.append(self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait())
            # Gather before producing: one wake-up, one conversion pass and one flush per batch
            # instead of per event. Sleeping here also keeps put() cheap (no reader to wake).
            if wait_s > 0 and self._linger_s > 0 and self._queue.qsize() < self.settings.batch_max_events:
                self._stop.wait(self._linger_s)
            while len(items) < self.settings.batch_max_events:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [item for item in items if item[0] != WAKE[0]]


class EventEmitter(QueuedEventHook):
    """Gateway hook that publishes PredictionEvent / FeedbackEvent to Kafka, spooling on outages.

    Call start() once the process is up and close() on shutdown. Counters (stats()):
    emitted (accepted by on_complete/on_feedback), delivered (acknowledged by Kafka on the
    first try), spooled (written to the spool), replayed (acknowledged from the spool), shed
    (dropped at the door: queue full, spool full or closed), dropped (conversion errors and
    records the broker rejects as such). Delivery is at-least-once.
    """

    def __init__(self, settings: EventSettings, *, producer_overrides: dict[str, Any] | None = None) -> None:
        """producer_overrides: librdkafka properties on top of make_confluent_producer's and ours."""
        super().__init__(settings)
        self.kafka = settings.kafka
        self._topics = {PREDICTION: settings.kafka.predictions_topic, FEEDBACK: settings.kafka.feedback_topic}
        self._producer_config: dict[str, Any] = {
            **producer_config(settings),
            "error_cb": self._on_error,
            **(producer_overrides or {}),
        }
        self._spool: Spool | None = None
        self._producer: Any = None
        self._thread: threading.Thread | None = None
        self._deadline = math.inf
        self._next_probe = 0.0
        self._outage_logged = False
        self._down_reason: str | None = None  # set by error_cb: drop the producer, probe again
        # Written by the sender thread only, so no lock is needed.
        self._delivered = 0
        self._spooled = 0
        self._replayed = 0
        self._shed_spool_full = 0
        self._dropped = 0

    def stats(self) -> dict[str, int]:
        spool = self._spool
        shed = self._shed_queue_full + self._shed_spool_full + self._shed_closed
        return {
            "emitted": self._emitted,
            "delivered": self._delivered,
            "spooled": self._spooled,
            "replayed": self._replayed,
            "shed": shed,
            "shed_queue_full": self._shed_queue_full,
            "shed_spool_full": self._shed_spool_full,
            "shed_closed": self._shed_closed,
            "dropped": self._dropped,
            "queue_depth": self._queue.qsize(),
            "spool_bytes": spool.pending_bytes if spool is not None else 0,
            "connected": int(self._producer is not None),
        }

    # -- lifecycle --

    def start(self) -> None:
        """Opens the spool (raises SpoolLocked if another process owns it) and starts the sender.

        Never waits for the broker: connecting, creating topics and replaying a spool left by a
        previous process all happen on the sender thread.
        """
        if self._thread is not None:
            return
        self._spool = Spool(
            self.settings.spool_dir,
            max_bytes=self.settings.spool_max_bytes,
            segment_bytes=self.settings.spool_segment_bytes,
            fsync=self.settings.spool_fsync,
        )
        self._thread = threading.Thread(target=self._run, name="event-emitter", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops accepting events and flushes what is queued to Kafka, or to the spool when the
        broker is unreachable or the time runs out. Returns within about timeout_s."""
        if self._closing:
            return
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._queue.put(WAKE)
        if self._thread is None:
            return
        self._thread.join(timeout_s + 1.0)
        if self._thread.is_alive():
            log.warning("event emitter: sender still busy after %.1fs; queued events may be lost", timeout_s)

    # -- sender thread --

    def _run(self) -> None:
        assert self._spool is not None
        try:
            while not self._stop.is_set():
                self._step()
            self._finish()
        except Exception:
            log.exception("event emitter: sender thread failed; events are no longer emitted")
            self._closing = True  # shed from now on instead of filling memory
        finally:
            self._disconnect()
            self._spool.close()

    def _step(self) -> None:
        assert self._spool is not None
        if self._producer is not None:
            self._producer.poll(0)  # serves error_cb (and librdkafka's log lines) when idle
            if self._down_reason is not None:
                self._broker_lost(self._down_reason)
        if self._producer is None and time.monotonic() >= self._next_probe:
            self._connect()
        backlog = self._producer is not None and not self._spool.is_empty
        # Wait for work only when nothing else is due: a backlog replays right away.
        if backlog:
            wait_s = 0.0
        elif self._producer is None:
            wait_s = min(0.2, max(0.0, self._next_probe - time.monotonic()))
        else:
            wait_s = 0.2
        items = self._take(wait_s)
        if items:
            self._dispatch(items)
        if self._producer is not None and not self._spool.is_empty:
            self._replay(self.settings.replay_chunk_events)
        elif not items:
            self._spool.sync()  # idle: make the "interval" fsync policy reach the disk

    def _encode(self, items: Sequence[tuple[int, Any]]) -> Iterator[SpoolRecord]:
        capture = self.settings.capture_max_values
        for kind, item in items:
            try:
                if kind == PREDICTION:
                    value = prediction_event(item, capture).SerializeToString()
                else:
                    value = feedback_event(item).SerializeToString()
                yield SpoolRecord(self._topics[kind], item.prediction_id.encode(), value)
            except Exception:
                self._dropped += 1
                log.exception("event emitter: could not convert a %s record", type(item).__name__)

    def _dispatch(self, items: Sequence[tuple[int, Any]]) -> None:
        """Kafka directly when connected and nothing is spooled; otherwise behind the spool."""
        assert self._spool is not None
        records = list(self._encode(items))
        if self._producer is not None and self._spool.is_empty:
            dropped_before = self._dropped
            failed = self._produce(records, self._flush_timeout())
            self._delivered += len(records) - len(failed) - (self._dropped - dropped_before)
            records = failed
            if failed or self._down_reason is not None:
                reason = f"{len(failed)} of a batch of {len(items)} events not acknowledged"
                self._broker_lost(self._down_reason or reason)
        self._to_spool(records)

    def _to_spool(self, records: Sequence[SpoolRecord]) -> None:
        assert self._spool is not None
        for record in records:
            try:
                self._spool.append(record.topic, record.key, record.value)
                self._spooled += 1
            except SpoolFull:
                self._shed_spool_full += 1

    def _produce(self, records: Sequence[SpoolRecord], timeout_s: float) -> list[SpoolRecord]:
        """Hands the records to librdkafka and waits for their delivery reports, at most timeout_s
        and not past a broker outage; returns the records not acknowledged, in order.

        Whatever is still queued or in flight at the end is purged (its report says so), so no
        record of this batch can reach the broker after the ones returned here, which go to the
        spool and are replayed before anything newer. Records the broker rejects as such (too
        large, invalid) are counted as dropped. Waits only on this thread, never the request path.
        """
        producer = self._producer
        deadline = time.monotonic() + timeout_s
        reports = _Reports(len(records))
        produced = 0
        if self._down_reason is None:
            produced = self._hand_over(producer, records, reports, deadline)
        # flush() returns the number of records (and librdkafka events) not done yet and serves
        # the failure reports and error_cb; in slices, so an outage ends the wait at once, and so
        # does a close() that began meanwhile (its deadline, less time to spool the rest).
        remaining = len(producer)
        while remaining > 0 and self._down_reason is None:
            left = min(deadline, self._deadline - 0.5) - time.monotonic()
            if left <= 0:
                break
            remaining = producer.flush(min(0.1, left))
        if remaining > 0:
            producer.purge(in_queue=True, in_flight=True)
            remaining = producer.flush(1.0)  # serves the purged records' (failure) reports
        # Nothing outstanding: a record without a failure report was acknowledged. Otherwise
        # (never seen) the unreported ones are spooled too: a duplicate rather than a loss.
        settled = remaining == 0
        failed: list[SpoolRecord] = []
        for position, (record, error) in enumerate(zip(records, reports.errors, strict=True)):
            if position >= produced or (error is None and not settled):
                failed.append(record)
            elif error is None:
                continue
            elif error.code() in _RECORD_ERRORS:
                self._dropped += 1
                log.error("event emitter: broker rejected an event on %s: %s", record.topic, error.str())
            else:
                failed.append(record)
        return failed

    def _hand_over(self, producer: Any, records: Sequence[SpoolRecord], reports: _Reports, deadline: float) -> int:
        """produce() each record (librdkafka only queues it); returns how many were taken."""
        for position, record in enumerate(records):
            report = partial(reports.store, position)
            try:
                try:
                    producer.produce(record.topic, record.value, record.key, on_delivery=report)
                except BufferError:
                    # librdkafka's bounded queue is full: let it drain (on this thread), once.
                    producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
                    producer.produce(record.topic, record.value, record.key, on_delivery=report)
            except BufferError:
                log.debug("event emitter: librdkafka queue still full; the rest of the batch is spooled")
                return position
            except KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is not None and error.code() in _RECORD_ERRORS:
                    reports.errors[position] = error  # rejected before sending (over message.max.bytes)
                    continue
                log.debug("event emitter: produce failed: %s", exc)  # unknown topic, fatal producer
                self._down_reason = self._down_reason or f"produce failed: {exc}"
                return position
        return len(records)

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka error_cb (served by poll/flush on the sender thread)."""
        if error.fatal() or error.code() in _BROKER_DOWN_ERRORS:
            self._down_reason = self._down_reason or f"{error.name()}: {error.str()}"
        else:  # transient (one connection, one request): librdkafka retries by itself
            log.debug("event emitter: librdkafka: %s", error.str())

    def _replay(self, max_records: int | None) -> None:
        assert self._spool is not None

        def send(batch: Sequence[SpoolRecord]) -> None:
            dropped_before = self._dropped
            failed = self._produce(batch, self._flush_timeout())
            if failed:
                reason = f"{len(failed)} of {len(batch)} replayed events not acknowledged"
                raise _BrokerDown(self._down_reason or reason)
            self._replayed += len(batch) - (self._dropped - dropped_before)

        try:
            self._spool.replay(send, batch_records=self.settings.batch_max_events, max_records=max_records)
        except _BrokerDown as exc:
            self._broker_lost(str(exc))
        else:
            if self._down_reason is not None:
                self._broker_lost(self._down_reason)
        # Keep the queue short: what arrived meanwhile goes behind the spool (one pass, so a
        # stream of arrivals cannot starve the replay).
        waiting = self._queue.qsize()
        while waiting > 0 and not self._stop.is_set() and (items := self._take(0.0)):
            self._dispatch(items)
            waiting -= len(items)

    def _flush_timeout(self) -> float:
        timeout = self.settings.delivery_timeout_s
        if self._closing:  # shutdown: what cannot be acknowledged in time goes to the spool
            timeout = min(timeout, max(0.1, self._deadline - time.monotonic() - 0.5))
        return timeout

    def _broker_reachable(self) -> bool:
        for server in self.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=0.5):
                    return True
            except (OSError, ValueError):
                continue
        return False

    def _connect(self) -> None:
        """Probes the broker; on success re-creates the topics (an in-memory broker loses them on
        restart) and a fresh producer (its producer id died with the old broker: an idempotent
        producer that outlives a restarted Tansu gets UnknownProducerId forever)."""
        self._next_probe = time.monotonic() + self.settings.probe_interval_s
        if not self._broker_reachable():
            self._log_outage("broker unreachable")
            return
        try:
            ensure_topics(self.kafka, list(self._topics.values()), timeout_s=self.settings.delivery_timeout_s)
            self._down_reason = None
            self._producer = make_confluent_producer(self.kafka, **self._producer_config)
        except Exception as exc:
            self._producer = None
            self._log_outage(f"{type(exc).__name__}: {exc}")
            return
        assert self._spool is not None
        if self._outage_logged or not self._spool.is_empty:
            log.info("event emitter: Kafka reachable; replaying %d spooled bytes", self._spool.pending_bytes)
        self._outage_logged = False

    def _log_outage(self, reason: str) -> None:
        if not self._outage_logged:  # once per outage, not once per probe
            log.warning("event emitter: Kafka unavailable (%s); spooling to %s", reason, self.settings.spool_dir)
            self._outage_logged = True

    def _broker_lost(self, reason: str) -> None:
        self._log_outage(reason)
        self._disconnect()
        self._next_probe = time.monotonic() + self.settings.probe_interval_s

    def _disconnect(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                # Nothing is outstanding between batches (each one ends acknowledged or purged
                # and spooled), so close() has nothing to flush and returns at once.
                producer.purge(in_queue=True, in_flight=True)
                producer.poll(0)
                producer.close()

    def _finish(self) -> None:
        """Shutdown: everything still queued goes to Kafka (if it answers in time) or the spool."""
        assert self._spool is not None
        while not self._queue.empty():
            if self._producer is not None and time.monotonic() >= self._deadline - 0.5:
                self._disconnect()  # out of time: the rest goes to the spool
            if items := self._take(0.0):
                self._dispatch(items)
        while self._producer is not None and not self._spool.is_empty and time.monotonic() < self._deadline - 1.0:
            self._replay(self.settings.batch_max_events)
        self._spool.sync()
