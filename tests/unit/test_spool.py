from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from services.gateway.spool import Spool, SpoolFull, SpoolLocked, SpoolRecord, encode_record


class Sink:
    """Collects replayed records; fails the Nth batch when asked to."""

    def __init__(self, fail_on_batch: int | None = None) -> None:
        self.records: list[SpoolRecord] = []
        self.batches = 0
        self.fail_on_batch = fail_on_batch

    def __call__(self, batch: Sequence[SpoolRecord]) -> None:
        self.batches += 1
        if self.batches == self.fail_on_batch:
            raise ConnectionError("broker went away")
        self.records.extend(batch)

    @property
    def values(self) -> list[bytes]:
        return [r.value for r in self.records]


def fill(spool: Spool, n: int, start: int = 0, topic: str = "t") -> list[bytes]:
    values = [f"value-{i}".encode() for i in range(start, start + n)]
    for i, value in zip(range(start, start + n), values, strict=True):
        spool.append(topic, f"k{i}".encode(), value)
    return values


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_replay_returns_records_in_append_order_with_topic_and_key(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=200) as spool:
        spool.append("predictions", b"p1", b"")  # empty values are legal
        values = [b"", *fill(spool, 50, topic="feedback")]
        sink = Sink()
        assert spool.replay(sink, batch_records=7) == 51
        assert sink.values == values
        assert sink.records[0] == SpoolRecord("predictions", b"p1", b"")
        assert sink.records[1] == SpoolRecord("feedback", b"k0", b"value-0")
        assert spool.is_empty
        assert spool.replay(sink) == 0


def test_segments_are_deleted_only_after_every_record_in_them_was_acknowledged(tmp_path: Path) -> None:
    record_size = len(encode_record("t", b"k0", b"value-0"))
    with Spool(tmp_path, segment_bytes=record_size * 10) as spool:
        fill(spool, 30)  # three segments of ten
        assert len(segments(tmp_path)) == 3
        sink = Sink()
        assert spool.replay(sink, batch_records=4, max_records=8) == 8
        assert len(segments(tmp_path)) == 3  # the first segment still has 2 unacknowledged records
        assert spool.replay(sink, batch_records=4, max_records=4) == 4
        assert len(segments(tmp_path)) == 2
        spool.replay(sink)
        assert segments(tmp_path) == []
        assert spool.total_bytes == 0
        assert sink.values == [f"value-{i}".encode() for i in range(30)]


def test_failed_batch_stays_in_the_spool_and_is_sent_again(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=10_000) as spool:
        values = fill(spool, 20)
        sink = Sink(fail_on_batch=2)
        with pytest.raises(ConnectionError):
            spool.replay(sink, batch_records=5)
        assert sink.values == values[:5]
        assert spool.replay(sink, batch_records=5) == 15
        assert sink.values == values
        assert spool.is_empty


def test_appends_during_replay_land_behind_and_are_replayed(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        fill(spool, 10)
        seen: list[bytes] = []

        def send(batch: Sequence[SpoolRecord]) -> None:
            seen.extend(r.value for r in batch)
            if len(seen) <= 10:  # more arrive while the first records are on their way
                spool.append("t", b"late", f"late-{len(seen)}".encode())

        spool.replay(send, batch_records=3)
        assert seen[:10] == [f"value-{i}".encode() for i in range(10)]
        assert seen[10:] == [b"late-3", b"late-6", b"late-9"]
        assert spool.is_empty


def test_records_survive_a_restart_and_acknowledged_ones_are_not_sent_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=10_000, fsync="always")
    values = fill(spool, 10)
    sink = Sink()
    spool.replay(sink, batch_records=4, max_records=4)
    spool.close()

    with Spool(tmp_path) as reopened:
        assert not reopened.is_empty
        more = fill(reopened, 3, start=10)  # a new process appends to a new segment, behind the old ones
        assert len(segments(tmp_path)) == 2
        rest = Sink()
        assert reopened.replay(rest) == 9
        assert rest.values == values[4:] + more
        assert segments(tmp_path) == []


def test_a_torn_last_record_is_skipped_and_everything_before_it_replays(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        values = fill(spool, 5)
    (segment,) = segments(tmp_path)
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # a crash in the middle of the last write

    with Spool(tmp_path) as reopened:
        sink = Sink()
        assert reopened.replay(sink) == 4
        assert sink.values == values[:4]
        assert reopened.is_empty
        assert segments(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "zeros"])
def test_a_corrupt_tail_fails_its_checksum(tmp_path: Path, damage: str) -> None:
    with Spool(tmp_path) as spool:
        values = fill(spool, 3)
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    if damage == "flip":
        data[-1] ^= 0xFF
    else:
        data += bytes(64)  # a filesystem that extended the file but never wrote the data
    segment.write_bytes(bytes(data))
    with Spool(tmp_path) as reopened:
        sink = Sink()
        reopened.replay(sink)
        assert sink.values == (values[:2] if damage == "flip" else values)


def test_full_spool_raises_and_keeps_what_it_holds(tmp_path: Path) -> None:
    record_size = len(encode_record("t", b"k0", b"value-0"))
    with Spool(tmp_path, max_bytes=record_size * 3) as spool:
        fill(spool, 3)
        with pytest.raises(SpoolFull):
            spool.append("t", b"k3", b"value-3")
        assert spool.total_bytes == record_size * 3
        sink = Sink()
        spool.replay(sink)
        assert len(sink.records) == 3
        spool.append("t", b"k4", b"value-4")  # room again once replayed
        assert spool.total_bytes == record_size


def test_one_process_per_directory(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolLocked):
        Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


def test_damaged_cursor_replays_from_the_oldest_segment(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        values = fill(spool, 4)
        spool.replay(Sink(), max_records=2)
    (tmp_path / "cursor").write_bytes(b"junk")
    with Spool(tmp_path) as reopened:
        sink = Sink()
        reopened.replay(sink)
        assert sink.values == values  # at-least-once: duplicates, never a loss
