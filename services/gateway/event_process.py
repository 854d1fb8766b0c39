"""Event emission in a child process, so the gateway's GIL and CPU stay with the requests it serves.

Converting a record to protobuf (~90 us under the GIL) and librdkafka's threads used to run
inside the serving process and took turns with its asyncio loop. Here the gateway's hook
(EventProcess) only queues the record; an "event-forwarder" thread flattens each batch into
plain tuples (record_to_wire), marshals it and writes it as one frame to a child process's
stdin. The child (`python -m services.gateway.event_process`) runs the unchanged EventEmitter:
protobuf conversion, Kafka, the spool.

    stdin (parent -> child): frames `u32 length | marshal blob`; a blob is a list of wire
        records, or ("close", timeout_s) for an orderly stop. EOF (the gateway died, even by
        SIGKILL) stops the child the same way: it flushes to Kafka or spools, then exits.
    control fd (child -> parent): JSON lines: {"ready": true} or {"error": "..."} once, then
        the emitter's stats() and the frames read so far whenever they change (checked every
        ~50 ms), at least once a second (a heartbeat), and once at the end.

When the child dies while the gateway runs, the forwarder starts another one (the spool's flock
died with the old child: the new one reopens the spool and replays it) and resends the batch it
could not write. A child that is alive but hung (silent on the control pipe, or not reading the
frames written to it, for child_stall_timeout_s) is killed by a watchdog thread and replaced
the same way. Events the dead child held in memory (its queue, the pipe's buffer, a batch
not yet acknowledged by Kafka) are lost; what it had spooled is replayed by its successor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import marshal
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from services.common.domain import (
    DTYPE_ITEMSIZE,
    GenerateInput,
    GenerationUsage,
    PredictInput,
    PredictResult,
    ServedBy,
    TensorData,
)
from services.common.settings import REPO_ROOT
from services.gateway.events import FEEDBACK, PREDICTION, WAKE, QueuedEventHook
from services.gateway.events_settings import EventSettings
from services.gateway.hooks import CompletedRequest, FeedbackRecord
from services.gateway.spool import SpoolLocked

log = logging.getLogger("services.gateway.event_process")  # not __name__: "__main__" in the child

_PREDICT_REQUEST = 0
_GENERATE_REQUEST = 1

# EventEmitter.stats() keys (a unit test holds the two lists together); the cumulative ones are
# summed over the children a gateway has had, the others describe the running child only.
STAT_KEYS = (
    "emitted",
    "delivered",
    "spooled",
    "replayed",
    "shed",
    "shed_queue_full",
    "shed_spool_full",
    "shed_closed",
    "dropped",
    "queue_depth",
    "spool_bytes",
    "connected",
)
_CUMULATIVE_KEYS = (
    "emitted",
    "delivered",
    "spooled",
    "replayed",
    "shed_queue_full",
    "shed_spool_full",
    "shed_closed",
    "dropped",
)

_FRAME_HEADER = struct.Struct("<I")
_MAX_FRAME_BYTES = 0xFFFF_FFFF  # what the u32 length can say
_SETTINGS_ENV = "MLMESH_EVENT_PROCESS_SETTINGS"  # not argv: the Kafka password would show in `ps`
_CLOSE_FRAME_KIND = "close"
_STATS_INTERVAL_S = 0.05
_HEARTBEAT_S = 1.0  # the child reports at least this often, changed or not
_WATCHDOG_INTERVAL_S = 0.5
_ORPHAN_CLOSE_TIMEOUT_S = 10.0  # the gateway died: nobody waits, EventEmitter.close's default
_EXIT_GRACE_S = 3.0  # beyond close's timeout, for the child to write its last stats and exit
_RESTART_BACKOFF_S = 0.5
_RESTART_BACKOFF_MAX_S = 8.0
_STABLE_CHILD_S = 10.0  # a child that lived this long resets the restart backoff
_SPOOL_LOCK_RETRY_S = 1.0


# -- wire format: nested tuples of str/bytes/int/float/None/list/dict, for marshal --
#
# Numbers go through int()/float(): marshal would write a numpy scalar as its raw bytes (buffer
# protocol) without complaint, and the child would then fail on it.


def _tensor_to_wire(tensor: TensorData, capture_max_values: int | None) -> tuple[Any, ...]:
    data = tensor.data
    if capture_max_values is not None:
        # prediction_event reads at most capture_max_values values, and none of a BYTES (or
        # unknown-dtype) tensor: the rest of a large tensor need not cross the pipe.
        item_size = DTYPE_ITEMSIZE.get(tensor.dtype)
        keep = capture_max_values * item_size if item_size else 0
        if len(data) > keep:
            data = data[:keep]
    return (tensor.name, tensor.dtype, tuple(int(dim) for dim in tensor.shape), data)


def _tensor_from_wire(t: Sequence[Any]) -> TensorData:
    name, dtype, shape, data = t
    return TensorData(name, dtype, shape, data)


def _served_to_wire(served: ServedBy | None) -> tuple[str, str, str, str] | None:
    if served is None:
        return None
    return (served.model, served.model_version, served.experiment, served.variant)


def _served_from_wire(t: Sequence[str] | None) -> ServedBy | None:
    return None if t is None else ServedBy(*t)


def _request_to_wire(request: PredictInput | GenerateInput, capture_max_values: int | None) -> tuple[Any, ...]:
    if isinstance(request, PredictInput):
        inputs = [_tensor_to_wire(tensor, capture_max_values) for tensor in request.inputs]
        return (_PREDICT_REQUEST, request.model, inputs, list(request.outputs), request.request_id, request.unit_id)
    if isinstance(request, GenerateInput):
        return (
            _GENERATE_REQUEST,
            request.model,
            request.prompt,
            int(request.max_tokens),
            float(request.temperature),
            float(request.top_p),
            int(request.seed),
            request.request_id,
            request.unit_id,
        )
    raise TypeError(f"unsupported request type {type(request).__name__}")


def _request_from_wire(t: Sequence[Any]) -> PredictInput | GenerateInput:
    if t[0] == _PREDICT_REQUEST:
        _, model, inputs, outputs, request_id, unit_id = t
        return PredictInput(model, [_tensor_from_wire(tensor) for tensor in inputs], outputs, request_id, unit_id)
    _, model, prompt, max_tokens, temperature, top_p, seed, request_id, unit_id = t
    return GenerateInput(model, prompt, max_tokens, temperature, top_p, seed, request_id, unit_id)


def _completed_to_wire(record: CompletedRequest, capture_max_values: int | None) -> tuple[Any, ...]:
    result = record.result
    usage = record.usage
    return (
        record.prediction_id,
        record.tenant,
        record.rpc,
        _request_to_wire(record.request, capture_max_values),
        _served_to_wire(record.served_by),
        record.status,
        record.error,
        float(record.started_at_unix),
        float(record.latency_ms),
        record.trace_id,
        None
        if result is None
        else (
            result.prediction_id,
            _served_to_wire(result.served_by),
            [_tensor_to_wire(tensor, capture_max_values) for tensor in result.outputs],
        ),
        record.completion_text,
        record.finish_reason,
        None
        if usage is None
        else (
            int(usage.input_tokens),
            int(usage.output_tokens),
            float(usage.time_to_first_token_ms),
            float(usage.total_time_ms),
        ),
        dict(record.extra),
    )


def _completed_from_wire(t: Sequence[Any]) -> CompletedRequest:
    (
        prediction_id,
        tenant,
        rpc,
        request,
        served_by,
        status,
        error,
        started_at_unix,
        latency_ms,
        trace_id,
        result,
        completion_text,
        finish_reason,
        usage,
        extra,
    ) = t
    return CompletedRequest(
        prediction_id=prediction_id,
        tenant=tenant,
        rpc=rpc,
        request=_request_from_wire(request),
        served_by=_served_from_wire(served_by),
        status=status,
        error=error,
        started_at_unix=started_at_unix,
        latency_ms=latency_ms,
        trace_id=trace_id,
        result=None
        if result is None
        else PredictResult(result[0], ServedBy(*result[1]), [_tensor_from_wire(t) for t in result[2]]),
        completion_text=completion_text,
        finish_reason=finish_reason,
        usage=None if usage is None else GenerationUsage(*usage),
        extra=extra,
    )


def _feedback_to_wire(fb: FeedbackRecord) -> tuple[Any, ...]:
    return (
        fb.feedback_id,
        fb.prediction_id,
        fb.tenant,
        fb.unit_id,
        float(fb.created_at_unix),
        fb.label,
        None if fb.rating is None else float(fb.rating),
        fb.outcome,
        fb.text,
        fb.trace_id,
    )


def record_to_wire(
    kind: int, item: CompletedRequest | FeedbackRecord, capture_max_values: int | None = None
) -> tuple[int, tuple[Any, ...]]:
    """(kind, item) as nested tuples that marshal can encode. capture_max_values: keep only the
    tensor bytes prediction_event reads with that setting (None: all, for an exact round trip)."""
    if kind == PREDICTION:
        assert isinstance(item, CompletedRequest)
        return (PREDICTION, _completed_to_wire(item, capture_max_values))
    if kind == FEEDBACK:
        assert isinstance(item, FeedbackRecord)
        return (FEEDBACK, _feedback_to_wire(item))
    raise ValueError(f"unknown record kind {kind}")


def record_from_wire(t: Sequence[Any]) -> tuple[int, CompletedRequest | FeedbackRecord]:
    """The inverse of record_to_wire."""
    kind, payload = t
    if kind == PREDICTION:
        return PREDICTION, _completed_from_wire(payload)
    if kind == FEEDBACK:
        return FEEDBACK, FeedbackRecord(*payload)
    raise ValueError(f"unknown record kind {kind}")


def _frame(blob: bytes) -> bytes:
    return _FRAME_HEADER.pack(len(blob)) + blob


# -- parent side --


class _Child:
    """One child process and what its control pipe said last (kept by a reader thread)."""

    def __init__(self, process: subprocess.Popen[bytes], control: IO[bytes]) -> None:
        self.process = process
        self.pid = process.pid
        self.started_at = time.monotonic()
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)  # replaced whole by the reader
        self.error: str | None = None
        self.ready = False
        self.answered = threading.Event()  # ready, error, or the pipe closed (the child exited)
        self.gone = threading.Event()  # the pipe closed: its last stats are in
        self.sent = 0  # records written to its stdin (forwarder thread)
        self.frames_sent = 0  # frames written to its stdin (forwarder thread)
        self.frames_read = 0  # frames it said it has read
        self.last_heard = self.started_at  # its last control line
        self.last_progress = self.started_at  # when it last read a frame, or was given one with none pending
        self.stall_killed = False
        self._reader = threading.Thread(target=self._read, args=(control,), name="event-process-reader", daemon=True)
        self._reader.start()

    def _read(self, control: IO[bytes]) -> None:
        try:
            with control:
                for line in control:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        log.warning("event process: unreadable control line %r", line[:200])
                        continue
                    self.last_heard = time.monotonic()
                    if "error" in message:
                        self.error = str(message["error"])
                        self.answered.set()
                    elif message.get("ready"):
                        self.ready = True
                        self.answered.set()
                    else:
                        self.stats = {key: int(message.get(key, 0)) for key in STAT_KEYS}
                        frames = int(message.get("frames", 0))
                        if frames != self.frames_read:
                            self.frames_read = frames
                            self.last_progress = self.last_heard
        finally:
            self.gone.set()
            self.answered.set()

    def alive(self) -> bool:
        return not self.gone.is_set() and self.process.poll() is None

    def wrote_frame(self, records: int) -> None:
        """Forwarder thread, after a frame was written to it."""
        if self.frames_sent == self.frames_read:  # nothing was pending: the unread clock starts now
            self.last_progress = time.monotonic()
        self.frames_sent += 1
        self.sent += records

    def stalled_for(self, now: float) -> float:
        return stall_seconds(now, self.last_heard, self.last_progress, self.frames_sent, self.frames_read)

    def lost_estimate(self) -> int:
        """Records written to it that its last report does not show as handled: about what died
        with it (reports lag by up to ~50 ms, so this errs on the high side)."""
        stats = self.stats
        handled = sum(stats[key] for key in ("delivered", "spooled", "dropped", "shed_queue_full", "shed_spool_full"))
        return max(0, self.sent - handled)

    def tell_to_close(self, timeout_s: float) -> None:
        """The close frame, then EOF; the child flushes within about timeout_s and exits."""
        stdin = self.process.stdin
        assert stdin is not None
        with contextlib.suppress(OSError, ValueError):  # already gone: nothing to tell
            stdin.write(_frame(marshal.dumps((_CLOSE_FRAME_KIND, timeout_s))))
            stdin.flush()
        self._close_stdin()

    def wait(self, timeout_s: float) -> None:
        """Waits up to timeout_s for it to exit, then kills it; reaps it, reads its last stats."""
        try:
            self.process.wait(max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            log.warning(
                "event process (pid %d) did not exit in time; killing it (%d events written to it were not"
                " reported delivered or spooled: lost)",
                self.pid,
                self.lost_estimate(),
            )
            self.process.kill()
            self.process.wait()
        self._close_stdin()
        self._reader.join(1.0)  # its last stats line is already in the pipe

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()  # a no-op once it was reaped
        self.process.wait()
        self._close_stdin()
        self._reader.join(1.0)

    def _close_stdin(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError, ValueError):  # BrokenPipeError flushing for a dead reader
                self.process.stdin.close()


def stall_seconds(now: float, last_heard: float, last_progress: float, frames_sent: int, frames_read: int) -> float:
    """How long a child has looked hung: silent on its control pipe, or not reading what it was
    given (its heartbeat thread may live on while its main thread is stuck)."""
    unread_s = now - last_progress if frames_sent > frames_read else 0.0
    return max(now - last_heard, unread_s)


class EventProcess(QueuedEventHook):
    """Gateway hook that hands events to an EventEmitter running in a child process.

    Same surface and stats() keys as EventEmitter. emitted is counted here (the request path);
    delivered, spooled, replayed, dropped and the shed counters add what the children reported
    (summed over every child this hook has run) to what was shed or dropped here; spool_bytes
    and connected are the running child's; queue_depth counts what waits here (the queue and the
    batch in hand) and in the child's queue. Delivery is at-least-once while the child lives; see
    the module docstring for what a child's crash loses.
    """

    def __init__(
        self,
        settings: EventSettings,
        *,
        startup_timeout_s: float = 30.0,
        spool_lock_wait_s: float = _ORPHAN_CLOSE_TIMEOUT_S + _EXIT_GRACE_S + 2.0,
    ) -> None:
        """spool_lock_wait_s: how long start() retries while the spool is locked. The event
        process of a gateway that was just killed may still be flushing into it (it outlives
        its parent by up to its close timeout); an in-process emitter's lock died at once."""
        super().__init__(settings)
        self._startup_timeout_s = startup_timeout_s
        self._spool_lock_wait_s = spool_lock_wait_s
        self._child_env = _child_env(settings)
        self._forwarder: threading.Thread | None = None
        self._close_requested = False
        self._deadline = math.inf  # close()'s; the forwarder keeps within it
        # (totals of the children that are gone, the running child): one tuple, swapped whole,
        # so stats() never counts a retiring child twice or not at all.
        self._children: tuple[dict[str, int], _Child | None] = (dict.fromkeys(_CUMULATIVE_KEYS, 0), None)
        self._next_start = 0.0
        self._backoff_s = _RESTART_BACKOFF_S
        # Written by the forwarder thread only, so no lock is needed.
        self._dropped = 0  # records that could not be put on the wire
        self._in_hand = 0  # records taken from the queue and not yet written to a child
        self.forwarded = 0  # records written to a child's stdin
        self.restarts = 0  # children started after the first
        self.stall_kills = 0  # hung children the watchdog killed
        self._watchdog: threading.Thread | None = None

    @property
    def child_pid(self) -> int | None:
        child = self._children[1]
        return child.pid if child is not None else None

    def stats(self) -> dict[str, int]:
        totals, child = self._children
        reported = child.stats if child is not None else dict.fromkeys(STAT_KEYS, 0)
        summed = {key: totals[key] + reported[key] for key in _CUMULATIVE_KEYS}
        shed_queue_full = self._shed_queue_full + summed["shed_queue_full"]
        shed_closed = self._shed_closed + summed["shed_closed"]
        return {
            "emitted": self._emitted,
            "delivered": summed["delivered"],
            "spooled": summed["spooled"],
            "replayed": summed["replayed"],
            "shed": shed_queue_full + summed["shed_spool_full"] + shed_closed,
            "shed_queue_full": shed_queue_full,
            "shed_spool_full": summed["shed_spool_full"],
            "shed_closed": shed_closed,
            "dropped": self._dropped + summed["dropped"],
            "queue_depth": self._queue.qsize() + self._in_hand + reported["queue_depth"],
            "spool_bytes": reported["spool_bytes"],
            # A child that died is not connected, whatever it said last.
            "connected": reported["connected"] if child is not None and not child.gone.is_set() else 0,
        }

    # -- lifecycle --

    def start(self) -> None:
        """Starts the child and waits until its emitter runs. Raises RuntimeError with the
        child's reason when it cannot start: SpoolLocked (a RuntimeError, as EventEmitter.start
        raises it) when another process still owns the spool after spool_lock_wait_s."""
        if self._forwarder is not None:
            return
        give_up_at = time.monotonic() + self._spool_lock_wait_s
        while True:
            try:
                child = self._spawn(self._startup_timeout_s)
                break
            except SpoolLocked:
                if time.monotonic() + _SPOOL_LOCK_RETRY_S > give_up_at:
                    raise
                log.info("event process: the spool is locked (a previous event process still flushing?); retrying")
                time.sleep(_SPOOL_LOCK_RETRY_S)
        self._children = (self._children[0], child)
        self._forwarder = threading.Thread(target=self._forward, name="event-forwarder", daemon=True)
        self._forwarder.start()
        if self.settings.child_stall_timeout_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="event-watchdog", daemon=True)
            self._watchdog.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops accepting events; the child flushes what is queued to Kafka, or to the spool
        when the broker is unreachable or the time runs out. Returns within about timeout_s plus
        a few seconds, even when the child hangs (it is killed then)."""
        if self._close_requested:
            return
        self._close_requested = True
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._queue.put(WAKE)
        forwarder = self._forwarder
        if forwarder is None:
            return
        forwarder.join(timeout_s + _EXIT_GRACE_S + 2.0)
        if forwarder.is_alive():
            # Blocked writing to a child that stopped reading: killing it fails the write.
            log.warning("event process: forwarder still busy after %.1fs; killing the child", timeout_s)
            child = self._children[1]
            if child is not None:
                with contextlib.suppress(OSError):
                    child.process.kill()
            forwarder.join(2.0)

    # -- forwarder thread --

    def _spawn(self, timeout_s: float) -> _Child:
        control_read, control_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway.event_process", "--control-fd", str(control_write)],
                stdin=subprocess.PIPE,
                pass_fds=(control_write,),
                env=self._child_env,
            )
        except BaseException:
            os.close(control_read)
            raise
        finally:
            os.close(control_write)  # the child's copy is the only one left: EOF when it exits
        child = _Child(process, os.fdopen(control_read, "rb"))
        if not child.answered.wait(timeout_s):
            child.kill()
            raise RuntimeError(f"the event process did not start within {timeout_s:.0f} s")
        if not child.ready:
            child.wait(2.0)  # it exits by itself after an error line
            reason = child.error or f"it exited with code {process.returncode}"
            error = SpoolLocked if reason.startswith(SpoolLocked.__name__ + ":") else RuntimeError
            raise error(f"the event process could not start: {reason}")
        log.info("event process: started (pid %d)", child.pid)
        return child

    def _forward(self) -> None:
        frame = b""  # the batch in hand, encoded, not yet written to a child
        count = 0  # records in that frame
        try:
            while True:
                if not frame:
                    if self._stop.is_set() and self._queue.empty():
                        break
                    items = self._take(0.0 if self._stop.is_set() else 0.2)
                    self._in_hand = len(items)
                    frame, count = self._encode(items)
                    if not frame:
                        self._in_hand = 0
                        if not self._stop.is_set():
                            self._running_child()  # a child that died while idle is replaced too
                        continue
                child = self._running_child()
                if child is None:  # none could be started yet; the batch waits (the queue is bounded)
                    if self._closing and time.monotonic() >= self._deadline - 1.0:
                        lost = self._in_hand + self._queue.qsize()
                        log.error("event process: no child to flush to before the close deadline; %d events lost", lost)
                        break
                    continue
                if self._write(child, frame):
                    child.wrote_frame(count)
                    self.forwarded += count
                    frame, count, self._in_hand = b"", 0, 0
        except Exception:
            log.exception("event process: forwarder failed; events are no longer emitted")
        finally:
            self._closing = True  # (when it failed) shed from now on instead of filling memory
            self._stop_child()

    def _watch(self) -> None:
        """Kills a running child that looks hung; the forwarder then replaces it (its blocked
        write fails, or it finds the child dead). Stops at close(), which has its own timeouts."""
        timeout_s = self.settings.child_stall_timeout_s
        while not self._stop.wait(_WATCHDOG_INTERVAL_S):
            child = self._children[1]
            if child is None or child.stall_killed or not child.ready or not child.alive():
                continue
            stalled_s = child.stalled_for(time.monotonic())
            if stalled_s > timeout_s:
                child.stall_killed = True
                self.stall_kills += 1
                log.error(
                    "event process (pid %d) looks hung (silent or not reading for %.1f s, %d of %d frames read);"
                    " killing it",
                    child.pid,
                    stalled_s,
                    child.frames_read,
                    child.frames_sent,
                )
                with contextlib.suppress(OSError):
                    child.process.kill()

    def _encode(self, items: Sequence[tuple[int, Any]]) -> tuple[bytes, int]:
        """The batch as one frame and how many records it holds (b"", 0: nothing to send)."""
        capture = self.settings.capture_max_values
        wires: list[tuple[int, tuple[Any, ...]]] = []
        for kind, item in items:
            try:
                wires.append(record_to_wire(kind, item, capture))
            except Exception:
                self._dropped += 1
                log.exception("event process: could not convert a %s record", type(item).__name__)
        try:
            blob = marshal.dumps(wires)
        except ValueError:  # a field of a type marshal refuses (a str subclass, say): find it
            wires = [wire for wire in wires if self._marshallable(wire)]
            blob = marshal.dumps(wires)
        if not wires:
            return b"", 0
        if len(blob) > _MAX_FRAME_BYTES:  # out of reach: tensors are cut, prompts are bounded
            self._dropped += len(wires)
            log.error("event process: a batch of %d bytes does not fit in a frame; dropped", len(blob))
            return b"", 0
        return _frame(blob), len(wires)

    def _marshallable(self, wire: tuple[int, tuple[Any, ...]]) -> bool:
        try:
            marshal.dumps(wire)
        except ValueError:
            self._dropped += 1
            log.exception("event process: could not encode an event for the child")
            return False
        return True

    def _write(self, child: _Child, frame: bytes) -> bool:
        """Blocks while the child's pipe is full (the request path sheds at the queue's bound).
        False when the child is gone: the caller starts another one and writes again."""
        stdin = child.process.stdin
        assert stdin is not None
        try:
            stdin.write(frame)
            stdin.flush()
        except (OSError, ValueError) as exc:  # BrokenPipeError (ValueError: a closed stdin)
            self._retire(child, f"stopped reading events ({type(exc).__name__})")
            return False
        return True

    def _running_child(self) -> _Child | None:
        """The running child; a dead one is replaced, no sooner than the backoff allows."""
        child = self._children[1]
        if child is not None and child.alive():
            return child
        if child is not None:
            self._retire(child, "exited")
        if self._closing and time.monotonic() >= self._deadline - 1.0:
            return None  # closing, and no time left to start one
        wait_s = self._next_start - time.monotonic()
        if wait_s > 0:
            time.sleep(min(wait_s, 0.2))  # short naps: close() may begin meanwhile
            return None
        try:
            child = self._spawn(min(self._startup_timeout_s, self._deadline - time.monotonic()))
        except Exception as exc:
            self._back_off()
            log.warning(
                "event process: restart failed (%s); next try in %.1f s", exc, self._next_start - time.monotonic()
            )
            return None
        self.restarts += 1
        self._children = (self._children[0], child)
        return child

    def _retire(self, child: _Child, reason: str) -> None:
        """A child that died or broke its pipe: reaped, its last counters kept in the totals."""
        child.kill()
        log.warning(
            "event process (pid %d) %s (exit code %s); %d events written to it were not reported delivered or"
            " spooled: lost (what it spooled is replayed by the next one)",
            child.pid,
            reason,
            child.process.returncode,
            child.lost_estimate(),
        )
        totals, final = self._children[0], child.stats
        self._children = ({key: totals[key] + final[key] for key in _CUMULATIVE_KEYS}, None)
        # A child that lived a while is replaced at once; one that keeps dying young, ever more
        # slowly: a crash loop would take CPU from the process that serves.
        if time.monotonic() - child.started_at >= _STABLE_CHILD_S:
            self._backoff_s = _RESTART_BACKOFF_S
            self._next_start = 0.0
        else:
            self._back_off()

    def _back_off(self) -> None:
        """No new child before the current backoff has passed; the next backoff doubles."""
        self._next_start = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _RESTART_BACKOFF_MAX_S)

    def _stop_child(self) -> None:
        """Shutdown: the child flushes with the time left, writes its last stats and exits."""
        child = self._children[1]
        if child is None:
            return
        deadline = self._deadline if self._deadline != math.inf else time.monotonic() + _ORPHAN_CLOSE_TIMEOUT_S
        remaining_s = max(0.1, deadline - time.monotonic())
        child.tell_to_close(remaining_s)
        child.wait(remaining_s + _EXIT_GRACE_S)
        if child.process.returncode != 0:
            log.warning("event process (pid %d) exited with code %s", child.pid, child.process.returncode)


def _child_env(settings: EventSettings) -> dict[str, str]:
    values = settings.model_dump(mode="json")
    password = settings.kafka.sasl_password
    if password is not None:  # a JSON dump shows a SecretStr as "**********"
        values["kafka"]["sasl_password"] = password.get_secret_value()
    # The child imports `services` whatever the gateway's working directory (which it keeps, so
    # relative paths in the settings mean the same there).
    python_path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(python_path), _SETTINGS_ENV: json.dumps(values)}


# -- child side --


def _send(control_fd: int, message: dict[str, Any]) -> None:
    # One write of a short line: atomic on a pipe, so two threads' lines never interleave.
    with contextlib.suppress(OSError):  # the gateway is gone: EOF on stdin tells the main thread
        os.write(control_fd, (json.dumps(message) + "\n").encode())


class _ChildReporter:
    """Writes the emitter's stats to the control fd whenever they change (polled), and exits
    the child when the emitter's sender thread died: the gateway then starts a fresh child
    instead of feeding one that only sheds."""

    def __init__(self, emitter: Any, control_fd: int) -> None:
        self.emitter = emitter
        self.control_fd = control_fd
        self.wire_errors = 0  # records that could not be rebuilt (main thread)
        self.frames_read = 0  # main thread: the gateway's watchdog sees whether we keep reading
        self.closing = False  # the emitter is being closed: its sender ends on purpose
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-stats", daemon=True)

    def stats(self) -> dict[str, int]:
        stats = self.emitter.stats()
        stats["dropped"] += self.wire_errors
        stats["frames"] = self.frames_read
        return stats

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        last: dict[str, int] | None = None
        last_sent = 0.0
        while not self._stop.wait(_STATS_INTERVAL_S):
            stats = self.stats()
            now = time.monotonic()
            if stats != last or now - last_sent >= _HEARTBEAT_S:  # unchanged ones too: a heartbeat
                _send(self.control_fd, stats)
                last, last_sent = stats, now
            sender = getattr(self.emitter, "_thread", None)
            if not self.closing and sender is not None and not sender.is_alive():
                log.error("event process: the emitter's sender thread died; exiting so the gateway starts another")
                logging.shutdown()
                os._exit(3)

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        _send(self.control_fd, self.stats())


def _read_frames(stdin: IO[bytes], emitter: Any, reporter: _ChildReporter) -> float:
    """Hands every record of every frame to the emitter; returns the close frame's timeout
    (or the orphan's, at EOF: the gateway died)."""
    while True:
        header = stdin.read(_FRAME_HEADER.size)
        if len(header) < _FRAME_HEADER.size:
            log.warning("event process: the gateway went away; flushing and exiting")
            return _ORPHAN_CLOSE_TIMEOUT_S
        (size,) = _FRAME_HEADER.unpack(header)
        blob = stdin.read(size)
        if len(blob) < size:
            log.warning("event process: the gateway went away mid-frame; flushing and exiting")
            return _ORPHAN_CLOSE_TIMEOUT_S
        message = marshal.loads(blob)
        if isinstance(message, tuple) and message[0] == _CLOSE_FRAME_KIND:
            return float(message[1])
        reporter.frames_read += 1
        for wire in message:
            try:
                kind, item = record_from_wire(wire)
            except Exception:
                reporter.wire_errors += 1
                log.exception("event process: could not rebuild a record")
                continue
            if kind == PREDICTION:
                emitter.on_complete(item)
            else:
                emitter.on_feedback(item)


def child_main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C in a terminal, or a supervisor stopping a whole process group or cgroup, signals us
    # with the gateway: the gateway decides when we stop (a close frame, or EOF if it died), so
    # that what we hold is flushed first. SIGKILL still ends us, as close() does past its time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(description="mlmesh gateway event emission (a child of the gateway)")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    control_fd: int = args.control_fd

    from services.common.telemetry import setup_logging
    from services.gateway.events import EventEmitter

    setup_logging(os.environ.get("MLMESH_LOG_LEVEL", "INFO"), os.environ.get("MLMESH_LOG_FORMAT", "text"))
    try:
        settings = EventSettings.model_validate_json(os.environ[_SETTINGS_ENV])
        # Each frame is a batch the forwarder already gathered for linger_ms: gathering again
        # here would only add that much to every event's lag.
        emitter = EventEmitter(settings.model_copy(update={"linger_ms": 0}))
        emitter.start()
    except Exception as exc:
        _send(control_fd, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(control_fd, {"ready": True})
    reporter = _ChildReporter(emitter, control_fd)
    reporter.start()
    try:
        timeout_s = _read_frames(sys.stdin.buffer, emitter, reporter)
    except Exception:
        log.exception("event process: could not read from the gateway; flushing and exiting")
        timeout_s = _ORPHAN_CLOSE_TIMEOUT_S
    reporter.closing = True
    emitter.close(timeout_s)
    reporter.finish()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
