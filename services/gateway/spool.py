"""Append-only on-disk spool for events the broker could not take (yet).

Layout: one directory holding numbered segment files (`<seq>.seg`) and a `cursor` file. A
record on disk is `u32 length | u32 crc | payload`, payload = `u16 topic_len | u32 key_len |
topic | key | value`; the crc covers the length and the payload, so a record torn by a crash
(or a zero-filled tail) is detected and the reader stops there. Replay reads in append order,
hands batches to a caller-supplied `send` that returns only once the broker acknowledged every
record, then advances the persisted cursor; a segment is deleted only after every record in it
was acknowledged. Delivery is at-least-once: a batch that failed half-way is sent again.

A new process never appends to old segments: it starts a new one after the highest number, so
a torn tail left by a crash stays behind the valid records instead of in front of new ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]

_HEADER = struct.Struct("<II")  # payload length, crc32(length bytes + payload)
_PAYLOAD_HEAD = struct.Struct("<HI")  # topic length, key length
_CURSOR = struct.Struct("<QQI")  # segment number, byte offset, crc32 of the first 16 bytes
_SUFFIX = ".seg"
_CURSOR_NAME = "cursor"
_LOCK_NAME = "lock"


class SpoolFull(Exception):
    """Appending would take the spool past its byte bound; the caller sheds the record."""


class SpoolLocked(RuntimeError):
    """Another live process owns this spool directory."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    topic: str
    key: bytes
    value: bytes


def encode_record(topic: str, key: bytes, value: bytes) -> bytes:
    topic_bytes = topic.encode()
    payload = b"".join((_PAYLOAD_HEAD.pack(len(topic_bytes), len(key)), topic_bytes, key, value))
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))) + payload


def _decode_payload(payload: bytes) -> SpoolRecord | None:
    if len(payload) < _PAYLOAD_HEAD.size:
        return None
    topic_len, key_len = _PAYLOAD_HEAD.unpack_from(payload)
    start = _PAYLOAD_HEAD.size
    if start + topic_len + key_len > len(payload):
        return None
    topic = payload[start : start + topic_len].decode(errors="replace")
    key = payload[start + topic_len : start + topic_len + key_len]
    return SpoolRecord(topic, key, payload[start + topic_len + key_len :])


def _read_record(reader: BinaryIO) -> tuple[SpoolRecord, int] | None:
    """The next valid record and its size on disk, or None at the end or at a torn/corrupt record."""
    header = reader.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    length, crc = _HEADER.unpack(header)
    if length < _PAYLOAD_HEAD.size:  # also rejects a zero-filled tail, whose crc would match
        return None
    payload = reader.read(length)
    if len(payload) < length or zlib.crc32(payload, zlib.crc32(header[:4])) != crc:
        return None
    record = _decode_payload(payload)
    return (record, _HEADER.size + length) if record is not None else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Thread-safe; one owner process per directory (enforced with an flock)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 16 * 1024 * 1024,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("spool: max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / _LOCK_NAME, "a+b")  # held for the spool's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLocked(f"spool directory {self.directory} is in use by another process") from None
        self._writer: BinaryIO | None = None  # opened on the first append of this process
        self._reader: BinaryIO | None = None
        self._reader_seq = -1
        self._dirty = False
        self._last_sync = time.monotonic()
        self._closed = False
        self._sizes: dict[int, int] = {self._seq(p): p.stat().st_size for p in self.directory.glob(f"*{_SUFFIX}")}
        self._total_bytes = sum(self._sizes.values())
        self._read_seq, self._read_offset = self._load_cursor()
        # Segments before the cursor were fully acknowledged (a crash hit before their deletion).
        for seq in [s for s in self._sizes if s < self._read_seq]:
            self._delete_segment(seq)
        self._write_seq = max([*self._sizes, self._read_seq]) + 1
        if self._read_seq not in self._sizes:
            self._read_seq, self._read_offset = min(self._sizes, default=self._write_seq), 0

    # -- bookkeeping --

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}{_SUFFIX}"

    @staticmethod
    def _seq(path: Path) -> int:
        return int(path.name.removesuffix(_SUFFIX))

    def _load_cursor(self) -> tuple[int, int]:
        try:
            raw = (self.directory / _CURSOR_NAME).read_bytes()
        except FileNotFoundError:
            return (min(self._sizes, default=0), 0)
        if len(raw) == _CURSOR.size:
            seq, offset, crc = _CURSOR.unpack(raw)
            if zlib.crc32(raw[:16]) == crc:
                return seq, offset
        # A damaged cursor only costs duplicates: start again at the oldest segment.
        log.warning("spool %s: unreadable cursor, replaying from the oldest segment", self.directory)
        return (min(self._sizes, default=0), 0)

    def _store_cursor(self) -> None:
        head = struct.pack("<QQ", self._read_seq, self._read_offset)
        tmp = self.directory / f".{_CURSOR_NAME}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(head + struct.pack("<I", zlib.crc32(head)))
            if self.fsync == "always":
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, self.directory / _CURSOR_NAME)

    def _delete_segment(self, seq: int) -> None:
        if self._reader is not None and self._reader_seq == seq:
            self._reader.close()
            self._reader, self._reader_seq = None, -1
        if self._writer is not None and seq == self._write_seq:
            self._writer.close()
            self._writer = None
            self._write_seq += 1  # never reopen a deleted number: the cursor may still name it
        with contextlib.suppress(FileNotFoundError):
            self._path(seq).unlink()
        self._total_bytes -= self._sizes.pop(seq, 0)

    # -- state --

    @property
    def total_bytes(self) -> int:
        """Bytes on disk, the quantity bounded by max_bytes."""
        return self._total_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes not yet acknowledged (a torn tail counts until replay passes it)."""
        with self._lock:
            return self._total_bytes - (self._read_offset if self._read_seq in self._sizes else 0)

    @property
    def is_empty(self) -> bool:
        return self.pending_bytes == 0

    # -- writing --

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        """Writes one record at the end; raises SpoolFull when it would not fit in max_bytes."""
        encoded = encode_record(topic, key, value)
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            if self._total_bytes + len(encoded) > self.max_bytes:
                raise SpoolFull(f"spool {self.directory} holds {self._total_bytes} of {self.max_bytes} bytes")
            if self._writer is not None and self._sizes.get(self._write_seq, 0) >= self.segment_bytes:
                self._roll()
            if self._writer is None:
                self._writer = open(self._path(self._write_seq), "ab", buffering=0)
                self._sizes.setdefault(self._write_seq, 0)
                if self.fsync == "always":
                    _fsync_dir(self.directory)
            # One unbuffered write per record: a reader in this process always sees whole records.
            self._writer.write(encoded)
            self._sizes[self._write_seq] += len(encoded)
            self._total_bytes += len(encoded)
            self._dirty = True
            if self.fsync == "always" or (
                self.fsync == "interval" and time.monotonic() - self._last_sync >= self.fsync_interval_s
            ):
                self._sync_locked()

    def _roll(self) -> None:
        assert self._writer is not None
        if self.fsync != "never":
            self._sync_locked()
        self._writer.close()
        self._writer = None
        self._write_seq += 1

    def _sync_locked(self) -> None:
        if self._writer is not None and self._dirty:
            os.fsync(self._writer.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """Forces written records to disk (callers with the "interval" policy call this when idle)."""
        with self._lock:
            if self.fsync != "never":
                self._sync_locked()

    # -- replay --

    def _next_batch(self, limit: int) -> tuple[list[SpoolRecord], int]:
        """Up to `limit` records from the cursor within one segment, and the offset after them.

        Skips (deletes) segments that hold nothing left to send. Lock held by the caller.
        """
        while self._read_seq in self._sizes:
            seq = self._read_seq
            if self._reader is None or self._reader_seq != seq:
                if self._reader is not None:
                    self._reader.close()
                self._reader, self._reader_seq = open(self._path(seq), "rb"), seq
            self._reader.seek(self._read_offset)
            batch: list[SpoolRecord] = []
            offset = self._read_offset
            while len(batch) < limit:
                item = _read_record(self._reader)
                if item is None:
                    break
                batch.append(item[0])
                offset += item[1]
            if batch:
                return batch, offset
            if offset < self._sizes[seq]:
                if self._writer is not None and seq == self._write_seq:
                    self._roll()  # cannot happen with whole-record writes; never append after garbage
                log.warning(
                    "spool %s: segment %d has %d unreadable bytes at %d (torn write); skipped",
                    self.directory,
                    seq,
                    self._sizes[seq] - offset,
                    offset,
                )
            # Everything in this segment was acknowledged: drop it and move to the next one.
            self._delete_segment(seq)
            later = [s for s in self._sizes if s > seq]
            self._read_seq, self._read_offset = (min(later), 0) if later else (self._write_seq, 0)
            self._store_cursor()
        return [], self._read_offset

    def replay(
        self,
        send: Callable[[Sequence[SpoolRecord]], None],
        *,
        batch_records: int = 500,
        max_records: int | None = None,
    ) -> int:
        """Sends pending records in append order; returns how many were acknowledged.

        `send(batch)` must return only when every record of the batch was acknowledged and raise
        otherwise; the exception propagates and the batch stays in the spool. Appends may run
        concurrently (they land behind the cursor and are replayed by this or a later call).
        """
        replayed = 0
        while max_records is None or replayed < max_records:
            limit = batch_records if max_records is None else min(batch_records, max_records - replayed)
            with self._lock:
                if self._closed:
                    break
                batch, end = self._next_batch(limit)
                seq = self._read_seq
            if not batch:
                break
            send(batch)  # outside the lock: appends continue while the broker works
            with self._lock:
                if self._read_seq == seq:
                    self._read_offset = end
                    self._store_cursor()
            replayed += len(batch)
        return replayed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.fsync != "never":
                self._sync_locked()
            for handle in (self._writer, self._reader):
                if handle is not None:
                    handle.close()
            self._writer = self._reader = None
            # The lock is released with the descriptor; a later process may now own the spool.
            self._lock_file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
