"""Coalesces concurrent Predicts for one batching model into one Triton call.

Every Python gRPC call to Triton costs CPU on both sides (and smaller batches in Triton's own
dynamic batcher); under concurrency the router merges requests that queue up while earlier
calls are in flight. With a free slot and nothing to gather for, a request goes out at once, so
sequential latency is unchanged.

Adaptive gathering (`gather_max_s` > 0): the callers of a batch that just came back usually send
their next requests at once (closed-loop clients, a pipeline's workers). For up to gather_max_s
after a batch completes, the lane waits until as many rows are queued as that batch had plus
those that were already waiting, then sends them together. A lone caller (a batch of one) is
never held: its next request meets the target by itself. Under steady concurrency the batches
grow to the number of callers, so Triton runs fewer, larger executions; a fixed hold in Triton
would instead delay every request, the lone ones too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from services.common import errors
from services.common.domain import TensorData
from services.router.triton import TritonBackend, model_deadline_exceeded

_NOT_SPLITTABLE = (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled)


@dataclass(slots=True)
class _Pending:
    inputs: list[TensorData]
    rows: int
    request_id: str
    deadline: float | None
    future: asyncio.Future[list[TensorData]]


@dataclass(slots=True)
class _Lane:
    queue: list[_Pending] = field(default_factory=list)
    in_flight: int = 0
    gather_until: float = 0.0  # monotonic time until which new requests wait for target_rows
    target_rows: int = 0  # the last completed call's rows plus those queued when it came back
    timer: asyncio.TimerHandle | None = None  # ends the current gathering

    def queued_rows(self) -> int:
        return sum(p.rows for p in self.queue)


def merge_inputs(group: list[_Pending]) -> list[TensorData]:
    """Concatenates each input along the batch (first) dimension; row-major bytes make this a join."""
    merged = []
    for position, first in enumerate(group[0].inputs):
        parts = [member.inputs[position] for member in group]
        rows = sum(p.shape[0] for p in parts)
        merged.append(TensorData(first.name, first.dtype, (rows, *first.shape[1:]), b"".join(p.data for p in parts)))
    return merged


def split_outputs(outputs: list[TensorData], row_counts: list[int]) -> list[list[TensorData]]:
    total = sum(row_counts)
    per_member: list[list[TensorData]] = [[] for _ in row_counts]
    for out in outputs:
        row_bytes = len(out.data) // total
        offset = 0
        for index, rows in enumerate(row_counts):
            end = offset + rows * row_bytes
            per_member[index].append(TensorData(out.name, out.dtype, (rows, *out.shape[1:]), out.data[offset:end]))
            offset = end
    return per_member


def _expire(lane: _Lane, pending: _Pending, model: str) -> None:
    """Deadline of a queued call: it leaves the queue (or, already sent, its batch skips it)."""
    if pending.future.done():
        return
    with contextlib.suppress(ValueError):
        lane.queue.remove(pending)
    pending.future.set_exception(model_deadline_exceeded(model))


class PredictBatcher:
    def __init__(self, backend: TritonBackend, max_in_flight: int = 1, gather_max_s: float = 0.0) -> None:
        self.backend = backend
        self.max_in_flight = max_in_flight
        self.gather_max_s = gather_max_s
        self._lanes: dict[tuple[str, str, tuple[str, ...]], _Lane] = {}

    async def infer(
        self,
        model: str,
        version: str,
        max_batch_size: int,
        inputs: list[TensorData],
        outputs: list[str],
        request_id: str,
        timeout_s: float | None,
    ) -> list[TensorData]:
        key = (model, version, tuple(outputs))
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        rows = inputs[0].shape[0]
        if (
            lane.in_flight < self.max_in_flight
            and not lane.queue
            and (rows >= lane.target_rows or time.monotonic() >= lane.gather_until)
        ):
            lane.in_flight += 1
            try:
                return await self.backend.infer(model, version, inputs, outputs, request_id, timeout_s)
            finally:
                lane.in_flight -= 1
                self._completed(key, lane, max_batch_size, rows)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = _Pending(inputs, rows, request_id, deadline, loop.create_future())
        lane.queue.append(pending)
        if lane.in_flight < self.max_in_flight:  # gathering: this arrival may complete the batch
            self._dispatch(key, lane, max_batch_size)
        # A timer on the future itself: cheaper than wait_for(shield(...)) on every queued call.
        timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, lane, pending, model)
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()
            if pending.future.cancelled():  # the caller left: don't send its rows at all
                with contextlib.suppress(ValueError):
                    lane.queue.remove(pending)

    def _completed(self, key: tuple[str, str, tuple[str, ...]], lane: _Lane, max_batch_size: int, rows: int) -> None:
        """A call came back: its callers are likely to send again. Gather for their rows plus
        those already waiting (in a closed loop, every caller), or until gather_max_s."""
        if self.gather_max_s > 0:
            lane.target_rows = rows + lane.queued_rows()
            lane.gather_until = time.monotonic() + self.gather_max_s
        self._dispatch(key, lane, max_batch_size)

    def _gather_timeout(self, key: tuple[str, str, tuple[str, ...]], lane: _Lane, max_batch_size: int) -> None:
        lane.timer = None
        self._dispatch(key, lane, max_batch_size)

    def _dispatch(self, key: tuple[str, str, tuple[str, ...]], lane: _Lane, max_batch_size: int) -> None:
        if lane.queue and lane.in_flight < self.max_in_flight and self.gather_max_s > 0:
            queued = lane.queued_rows()
            wait_s = lane.gather_until - time.monotonic()
            if wait_s > 0 and queued < lane.target_rows and queued < max_batch_size:
                if lane.timer is None:
                    lane.timer = asyncio.get_running_loop().call_later(
                        wait_s, self._gather_timeout, key, lane, max_batch_size
                    )
                return
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
        while lane.queue and lane.in_flight < self.max_in_flight:
            group, rows = [], 0
            while lane.queue and rows + lane.queue[0].rows <= max_batch_size:
                member = lane.queue.pop(0)
                group.append(member)
                rows += member.rows
            if not group:  # a single request larger than the batch limit goes alone
                group.append(lane.queue.pop(0))
            lane.in_flight += 1
            asyncio.get_running_loop().create_task(self._run(key, lane, max_batch_size, group))

    async def _run(
        self, key: tuple[str, str, tuple[str, ...]], lane: _Lane, max_batch_size: int, group: list[_Pending]
    ) -> None:
        model, version, outputs = key
        rows = sum(m.rows for m in group)
        try:
            if len(group) == 1:
                await self._run_one(model, version, list(outputs), group[0])
                return
            deadlines = [m.deadline for m in group]
            timeout = None if None in deadlines else max(d for d in deadlines if d is not None) - time.monotonic()
            try:
                results = await self.backend.infer(
                    model, version, merge_inputs(group), list(outputs), group[0].request_id, timeout
                )
            except _NOT_SPLITTABLE as exc:
                for member in group:
                    if not member.future.done():
                        member.future.set_exception(exc)
                return
            except errors.MeshError:
                # One bad member must not fail the others: each retries alone and gets its own answer.
                await asyncio.gather(*(self._run_one(model, version, list(outputs), m) for m in group))
                return
            for member, member_outputs in zip(group, split_outputs(results, [m.rows for m in group]), strict=True):
                if not member.future.done():
                    member.future.set_result(member_outputs)
        finally:
            lane.in_flight -= 1
            self._completed(key, lane, max_batch_size, rows)

    async def _run_one(self, model: str, version: str, outputs: list[str], member: _Pending) -> None:
        timeout = None if member.deadline is None else member.deadline - time.monotonic()
        try:
            result = await self.backend.infer(model, version, member.inputs, outputs, member.request_id, timeout)
        except errors.MeshError as exc:
            if not member.future.done():
                member.future.set_exception(exc)
            return
        if not member.future.done():
            member.future.set_result(result)
