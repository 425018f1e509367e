"""Tests for :mod:`chatd.backends.embedded._segments`, the append-only segment log of one replica.

Every test is synchronous and works on real files in ``tmp_path``. The two acceptance tests
for crash recovery cut the last record of the log at every byte offset and flip every bit of
it; both must leave exactly the earlier records, report no damage and keep the log usable.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from records import Record, read_records

from chatd.backends.embedded import _segments
from chatd.backends.embedded._segments import (
    HEADER_BYTES,
    MAGIC,
    Damage,
    Position,
    ReplicaFailed,
    SegmentLog,
    encode_record,
)

Entries = Sequence[tuple[int, bytes]]

# Layouts for the recovery tests: SegmentLog keyword arguments and how many records to write.
# make_records() gives 22-28 byte records, so with segment_bytes=40 a segment holds two
# records (the last record alone in segment 3 for five records, second of two for six) and
# with segment_bytes=70 it holds three.
ONE_SEGMENT = pytest.param({}, 5, id="one segment")
LAST_ALONE = pytest.param({"segment_bytes": 40}, 5, id="alone in last of 3 segments")
LAST_OF_TWO = pytest.param({"segment_bytes": 40}, 6, id="second in last of 3 segments")
LAYOUTS = [ONE_SEGMENT, LAST_ALONE, LAST_OF_TWO]

_opened: list[SegmentLog] = []


@pytest.fixture(autouse=True)
def _close_logs() -> Iterator[None]:
    """Close every log a test opened, so hundreds of recoveries do not leak descriptors."""
    yield
    while _opened:
        _opened.pop().close()


# -- helpers ------------------------------------------------------------------------------


def open_log(directory: Path, **kw: Any) -> SegmentLog:
    """A SegmentLog on ``directory``, closed at the end of the test."""
    log = SegmentLog(directory, **kw)
    _opened.append(log)
    return log


def make_records(count: int, start: int = 0) -> list[tuple[int, bytes]]:
    """Distinct (type, payload) pairs with varied types and 13-19 byte payloads."""
    return [(1 + i * 37 % 255, f"payload-{i:04d}-".encode() + bytes([65 + i % 26]) * (i % 7))
            for i in range(start, start + count)]


def write_log(directory: Path, entries: Entries, **kw: Any) -> list[Position]:
    """Recover ``directory``, append each entry in its own call, sync, close."""
    log = open_log(directory, **kw)
    list(log.recover())
    positions = [log.append([entry])[0] for entry in entries]
    log.sync()
    log.close()
    return positions


def reread(directory: Path, **kw: Any) -> tuple[list[Record], SegmentLog]:
    """Recover ``directory`` with a fresh SegmentLog: the records and the (open) log."""
    log = open_log(directory, **kw)
    return list(read_records(log)), log


def expected(entries: Entries, positions: Sequence[Position]) -> list[Record]:
    """The records that ``entries`` written at ``positions`` must read back as."""
    return [Record(position, record_type, payload)
            for position, (record_type, payload) in zip(positions, entries, strict=True)]


def seg_path(directory: Path, serial: int) -> Path:
    return directory / f"{serial:020d}.seg"


def record_end(entries: Entries, positions: Sequence[Position], index: int) -> int:
    """Offset just past record ``index`` in its segment."""
    return positions[index].offset + HEADER_BYTES + len(entries[index][1])


def snapshot(directory: Path) -> dict[str, bytes]:
    """The name and contents of every file in ``directory``."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def clone(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def assert_recovers_as_prefix(directory: Path, entries: Entries, positions: Sequence[Position],
                              kw: dict[str, Any], *, cut_bytes: int) -> None:
    """Recovery of a log whose last record is torn: the other records, the tail truncated on
    disk, nothing reported as damage, and the log appends and reads back after the cut."""
    last = positions[-1]
    records, log = reread(directory, **kw)
    assert records == expected(entries[:-1], positions[:-1])
    assert log.damage == []
    assert log.truncated == cut_bytes
    assert seg_path(directory, last.segment).stat().st_size == last.offset
    assert log.current_segment == last.segment
    new = log.append([(9, b"written after recovery")])
    assert new == [last]
    log.sync()
    log.close()
    again, log = reread(directory, **kw)
    assert again == expected([*entries[:-1], (9, b"written after recovery")],
                             [*positions[:-1], *new])
    assert (log.damage, log.truncated) == ([], 0)


# -- format and round trip ----------------------------------------------------------------


def test_on_disk_format_matches_docstring(tmp_path: Path) -> None:
    write_log(tmp_path, [(7, b"hello")])
    head = struct.pack(">IB", 5, 7)
    record = head + struct.pack(">I", zlib.crc32(head + b"hello")) + b"hello"
    assert encode_record(7, b"hello") == record
    assert [p.name for p in tmp_path.iterdir()] == ["00000000000000000001.seg"]
    assert (tmp_path / "00000000000000000001.seg").read_bytes() == MAGIC + record


def test_round_trip_in_order_with_positions(tmp_path: Path) -> None:
    directory = tmp_path / "not" / "yet" / "there"
    entries = [*make_records(10), (255, b""), (1, bytes(range(256)) * 4)]
    positions = write_log(directory, entries, max_record=1024)
    assert directory.is_dir()
    offsets = [len(MAGIC)]
    for _, payload in entries[:-1]:
        offsets.append(offsets[-1] + HEADER_BYTES + len(payload))
    assert positions == [Position(1, offset) for offset in offsets]
    records, log = reread(directory, max_record=1024)
    assert records == expected(entries, positions)
    assert (log.damage, log.truncated) == ([], 0)
    assert log.current_segment == 1


def test_batch_round_trip(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    list(log.recover())
    batches = [make_records(3), make_records(1, 3), make_records(4, 4)]
    positions = [position for batch in batches for position in log.append(batch)]
    log.sync()
    records, _ = reread(tmp_path)
    assert records == expected([entry for batch in batches for entry in batch], positions)


def test_empty_directory_recovers_to_nothing_and_appends(tmp_path: Path) -> None:
    records, log = reread(tmp_path)
    assert records == []
    assert (log.damage, log.truncated, log.segments(), log.current_segment) == ([], 0, [], 0)
    assert log.append([(3, b"first")]) == [Position(1, len(MAGIC))]
    assert log.current_segment == 1
    log.sync()
    log.close()
    records, _ = reread(tmp_path)
    assert records == [Record(Position(1, len(MAGIC)), 3, b"first")]


MAX = 64
BAD_BATCHES = {
    "type 0": [(0, b"x")],
    "type 256": [(256, b"x")],
    "payload over max_record": [(1, bytes(MAX + 1))],
    "valid then type 0": [(1, b"ok"), (0, b"x")],
    "valid then oversized": [(1, b"ok"), (1, bytes(MAX + 1))],
}
# Log states before the refused append: SegmentLog keywords and how many records it holds.
LOG_STATES = {
    "open segment": ({}, 3),
    "empty log": ({}, 0),
    "full segment": ({"segment_bytes": 30}, 3),
}


def _refusal_cases() -> Iterator[Any]:
    for batch_id, batch in BAD_BATCHES.items():
        for state_id, (kw, count) in LOG_STATES.items():
            yield pytest.param(batch, kw, count, id=f"{batch_id}, {state_id}")


@pytest.mark.parametrize(("batch", "kw", "count"), list(_refusal_cases()))
def test_invalid_records_are_refused_without_writing(
        tmp_path: Path, batch: Entries, kw: dict[str, Any], count: int) -> None:
    entries = make_records(count)
    positions = write_log(tmp_path, entries, max_record=MAX, **kw)
    before = snapshot(tmp_path)
    _, log = reread(tmp_path, max_record=MAX, **kw)
    with pytest.raises(ValueError):
        log.append(batch)
    assert snapshot(tmp_path) == before
    assert log.failed is None
    new = log.append([(2, b"fine")])
    log.sync()
    records, _ = reread(tmp_path, max_record=MAX, **kw)
    assert records == expected([*entries, (2, b"fine")], positions + new)


def test_payload_of_exactly_max_record_is_accepted(tmp_path: Path) -> None:
    positions = write_log(tmp_path, [(1, bytes(MAX))], max_record=MAX)
    records, _ = reread(tmp_path, max_record=MAX)
    assert records == [Record(positions[0], 1, bytes(MAX))]


@pytest.mark.parametrize("consumed", [0, 1, 2], ids=["not started", "one record", "two"])
def test_append_before_recover_is_exhausted_raises(tmp_path: Path, consumed: int) -> None:
    write_log(tmp_path, make_records(3))
    before = snapshot(tmp_path)
    log = open_log(tmp_path)
    recovery = log.recover()
    for _ in range(consumed):
        next(recovery)
    with pytest.raises(RuntimeError):
        log.append([(1, b"too early")])
    assert snapshot(tmp_path) == before


# -- rolling ------------------------------------------------------------------------------


def test_rolling_never_splits_a_batch(tmp_path: Path) -> None:
    segment_bytes = 100
    log = open_log(tmp_path, segment_bytes=segment_bytes)
    list(log.recover())
    entries: list[tuple[int, bytes]] = []
    positions: list[Position] = []
    for size in [1, 3, 2, 6, 1, 1, 4, 2, 5]:  # 6 records (~150 bytes) exceed segment_bytes
        batch = make_records(size, len(entries))
        got = log.append(batch)
        if positions:
            previous_end = record_end(entries, positions, -1)
            if previous_end >= segment_bytes:
                assert got[0] == Position(positions[-1].segment + 1, len(MAGIC))
            else:
                assert got[0] == Position(positions[-1].segment, previous_end)
        assert {p.segment for p in got} == {log.current_segment}
        assert got[0].offset < segment_bytes
        assert log.current_segment == max(log.segments())
        entries += batch
        positions += got
    log.sync()
    serials = log.segments()
    assert len(serials) >= 4
    assert serials == list(range(1, len(serials) + 1))
    records, log = reread(tmp_path, segment_bytes=segment_bytes)
    assert records == expected(entries, positions)
    assert (log.damage, log.truncated) == ([], 0)
    assert log.current_segment == serials[-1]


# -- torn tails ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "count"), LAYOUTS)
def test_torn_tail_cut_at_every_offset(tmp_path: Path, kw: dict[str, Any], count: int) -> None:
    """Acceptance: cut the last segment at every length from the start of the last record
    (inside its header and its payload) up to one byte short of the end."""
    original = tmp_path / "original"
    entries = make_records(count)
    positions = write_log(original, entries, **kw)
    last = positions[-1]
    assert last.segment == (1 if not kw else 3)
    end = seg_path(original, last.segment).stat().st_size
    assert end == record_end(entries, positions, -1)
    for cut in range(last.offset, end):
        work = clone(original, tmp_path / f"cut-{cut}")
        os.truncate(seg_path(work, last.segment), cut)
        assert_recovers_as_prefix(work, entries, positions, kw, cut_bytes=cut - last.offset)


@pytest.mark.parametrize(("kw", "count"), LAYOUTS)
def test_bit_flip_in_last_record_is_torn_tail(tmp_path: Path, kw: dict[str, Any],
                                              count: int) -> None:
    """Acceptance: flip every bit of the last record (header and payload) in turn."""
    original = tmp_path / "original"
    entries = make_records(count)
    positions = write_log(original, entries, **kw)
    last = positions[-1]
    data = seg_path(original, last.segment).read_bytes()
    for index in range(last.offset, len(data)):
        for bit in range(8):
            work = clone(original, tmp_path / f"flip-{index}-{bit}")
            flipped = bytearray(data)
            flipped[index] ^= 1 << bit
            seg_path(work, last.segment).write_bytes(flipped)
            assert_recovers_as_prefix(work, entries, positions, kw,
                                      cut_bytes=len(data) - last.offset)


@pytest.mark.parametrize("over_last_record", [False, True],
                         ids=["after last record", "over last record"])
def test_zero_filled_tail_is_truncated(tmp_path: Path, over_last_record: bool) -> None:
    entries = make_records(5)
    positions = write_log(tmp_path, entries)
    path = seg_path(tmp_path, 1)
    data = path.read_bytes()
    keep = positions[-1].offset if over_last_record else len(data)
    path.write_bytes(data[:keep] + bytes(4096))
    kept = len(entries) - over_last_record
    records, log = reread(tmp_path)
    assert records == expected(entries[:kept], positions[:kept])
    assert (log.damage, log.truncated) == ([], 4096)
    assert path.stat().st_size == keep
    new = log.append([(4, b"after zeros")])
    assert new == [Position(1, keep)]
    log.sync()
    records, _ = reread(tmp_path)
    assert records == expected([*entries[:kept], (4, b"after zeros")], [*positions[:kept], *new])


@pytest.mark.parametrize("content", [b"", MAGIC[:1], MAGIC[:5], MAGIC[:7], MAGIC],
                         ids=["empty", "1 byte of magic", "5 bytes", "7 bytes", "magic only"])
@pytest.mark.parametrize("earlier", [0, 4], ids=["only segment", "after a full segment"])
def test_just_created_last_segment(tmp_path: Path, content: bytes, earlier: int) -> None:
    entries = make_records(earlier)
    positions = write_log(tmp_path, entries)
    serial = 2 if earlier else 1
    seg_path(tmp_path, serial).write_bytes(content)
    records, log = reread(tmp_path)
    assert records == expected(entries, positions)
    assert log.damage == []
    assert log.truncated == (0 if content == MAGIC else len(content))
    new = log.append([(6, b"into the new segment")])
    assert new == [Position(serial, len(MAGIC))]
    log.sync()
    assert seg_path(tmp_path, serial).read_bytes()[:len(MAGIC)] == MAGIC
    records, log = reread(tmp_path)
    assert records == expected([*entries, (6, b"into the new segment")], positions + new)
    assert (log.damage, log.truncated) == ([], 0)


# -- damage before the end ----------------------------------------------------------------


def _xor(mask: int) -> Callable[[int], int]:
    return lambda byte: byte ^ mask


CORRUPTIONS = [
    pytest.param(0, _xor(0x80), id="length high byte"),
    pytest.param(3, _xor(0x01), id="length low bit"),
    pytest.param(4, lambda byte: 0, id="type set to 0"),
    pytest.param(6, _xor(0x10), id="crc byte"),
    pytest.param(HEADER_BYTES + 2, _xor(0x04), id="payload byte"),
]
# SegmentLog keywords, records written, which record to damage (the middle one of its segment).
MIDDLE_RECORDS = [
    pytest.param({}, 5, 2, id="one segment"),
    pytest.param({"segment_bytes": 70}, 7, 1, id="first of 3 segments"),
    pytest.param({"segment_bytes": 70}, 7, 4, id="middle of 3 segments"),
]


@pytest.mark.parametrize(("at", "change"), CORRUPTIONS)
@pytest.mark.parametrize(("kw", "count", "victim"), MIDDLE_RECORDS)
def test_damaged_middle_record_is_reported(tmp_path: Path, at: int, change: Callable[[int], int],
                                           kw: dict[str, Any], count: int, victim: int) -> None:
    entries = make_records(count)
    positions = write_log(tmp_path, entries, **kw)
    damaged = positions[victim]
    assert positions[victim - 1].segment == damaged.segment == positions[victim + 1].segment
    path = seg_path(tmp_path, damaged.segment)
    data = bytearray(path.read_bytes())
    data[damaged.offset + at] = change(data[damaged.offset + at])
    path.write_bytes(data)
    before = sizes(tmp_path)
    records, log = reread(tmp_path, **kw)
    survivors = [i for i in range(count) if i != victim]
    assert records == expected([entries[i] for i in survivors], [positions[i] for i in survivors])
    assert log.damage == [Damage(damaged.segment, damaged.offset,
                                 positions[victim + 1].offset, "bad_record")]
    assert log.truncated == 0
    assert sizes(tmp_path) == before


TAIL_DAMAGE = [
    pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 0x01]), True, id="flip last byte"),
    pytest.param(lambda data: data[:-3], True, id="cut last 3 bytes"),
    pytest.param(lambda data: data + bytes(512), False, id="zeros appended"),
]


@pytest.mark.parametrize(("mutate", "loses_record"), TAIL_DAMAGE)
def test_damaged_end_of_non_last_segment_is_reported_not_truncated(
        tmp_path: Path, mutate: Callable[[bytes], bytes], loses_record: bool) -> None:
    kw = {"segment_bytes": 40}
    entries = make_records(6)
    positions = write_log(tmp_path, entries, **kw)
    assert [p.segment for p in positions] == [1, 1, 2, 2, 3, 3]
    path = seg_path(tmp_path, 2)
    original_size = path.stat().st_size
    path.write_bytes(mutate(path.read_bytes()))
    damaged_size = path.stat().st_size
    records, log = reread(tmp_path, **kw)
    survivors = [0, 1, 2, 4, 5] if loses_record else list(range(6))
    assert records == expected([entries[i] for i in survivors], [positions[i] for i in survivors])
    start = positions[3].offset if loses_record else original_size
    assert log.damage == [Damage(2, start, damaged_size, "bad_record")]
    assert log.truncated == 0
    assert path.stat().st_size == damaged_size


@pytest.mark.parametrize("serial", [1, 2, 3], ids=["first segment", "middle", "last segment"])
def test_damaged_magic_is_reported(tmp_path: Path, serial: int) -> None:
    kw = {"segment_bytes": 40}
    entries = make_records(5)  # segments [0, 1], [2, 3], [4]: room left in segment 3
    positions = write_log(tmp_path, entries, **kw)
    path = seg_path(tmp_path, serial)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20
    path.write_bytes(data)
    bad_magic = Damage(serial, 0, len(data), "bad_magic")
    survivors = [i for i, p in enumerate(positions) if p.segment != serial]
    records, log = reread(tmp_path, **kw)
    assert records == expected([entries[i] for i in survivors], [positions[i] for i in survivors])
    assert (log.damage, log.truncated) == ([bad_magic], 0)
    assert path.read_bytes() == data
    new = log.append([(8, b"after bad magic")])
    if serial == 3:  # the damaged segment is never appended to: a new one is started
        assert new == [Position(4, len(MAGIC))]
    else:
        assert new == [Position(3, record_end(entries, positions, -1))]
    log.sync()
    records, log = reread(tmp_path, **kw)
    assert records == expected([*(entries[i] for i in survivors), (8, b"after bad magic")],
                               [*(positions[i] for i in survivors), *new])
    assert (log.damage, log.truncated) == ([bad_magic], 0)


# -- failure ------------------------------------------------------------------------------


class FailOnce:
    """Stands in for ``os`` inside ``_segments``: the named function raises EIO on its first
    call and works afterwards, so a log that retried would appear to succeed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        real = getattr(os, attr)
        if attr != self.name:
            return real

        def call(*args: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise OSError(errno.EIO, f"injected {attr} failure")
            return real(*args)

        return call


def _append(log: SegmentLog) -> None:
    log.append([(1, b"x")])


def _append_then_sync(log: SegmentLog) -> None:
    log.append([(1, b"x")])
    log.sync()


def _append_until_roll(log: SegmentLog) -> None:
    log.append([(1, b"fills the segment")])
    log.append([(1, b"rolls")])


def _delete_oldest(log: SegmentLog) -> None:
    log.delete(1)


FAILURES = [
    pytest.param("write", _append, id="write in append"),
    pytest.param("fsync", _append_then_sync, id="fsync in sync"),
    pytest.param("open", _append_until_roll, id="open in roll"),
    pytest.param("fsync", _delete_oldest, id="directory fsync in delete"),
]


@pytest.mark.parametrize(("os_call", "operation"), FAILURES)
def test_failure_is_sticky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, os_call: str,
                           operation: Callable[[SegmentLog], None]) -> None:
    kw = {"segment_bytes": 40}
    write_log(tmp_path, make_records(5), **kw)  # segments 1, 2, 3
    _, log = reread(tmp_path, **kw)
    fake = FailOnce(os_call)
    monkeypatch.setattr(_segments, "os", fake)
    with pytest.raises(ReplicaFailed) as excinfo:
        operation(log)
    assert isinstance(log.failed, OSError)
    assert excinfo.value.__cause__ is log.failed
    assert fake.calls == 1
    later: list[Callable[[], object]] = [
        lambda: log.append([(1, b"after failure")]),
        log.sync,
        lambda: log.delete(2),
        lambda: list(log.recover()),
    ]
    for call in later:
        with pytest.raises(ReplicaFailed):
            call()
    assert fake.calls == 1  # nothing retried the failed call
    assert isinstance(log.failed, OSError)


# -- deleting and directory fsync ---------------------------------------------------------


def test_delete_removes_old_segment_and_refuses_current(tmp_path: Path) -> None:
    kw = {"segment_bytes": 40}
    entries = make_records(6)
    positions = write_log(tmp_path, entries, **kw)
    _, log = reread(tmp_path, **kw)
    assert log.segments() == [1, 2, 3]
    log.delete(1)
    assert not seg_path(tmp_path, 1).exists()
    assert log.segments() == [2, 3]
    with pytest.raises(ValueError):
        log.delete(3)
    assert seg_path(tmp_path, 3).exists()
    assert log.failed is None
    log.close()
    records, log = reread(tmp_path, **kw)
    assert records == expected(entries[2:], positions[2:])
    assert (log.damage, log.truncated) == ([], 0)


def test_sync_fsyncs_directory_only_after_new_files(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(_segments, "_fsync_dir", calls.append)
    log = open_log(tmp_path, segment_bytes=40)
    list(log.recover())
    log.append([(1, b"a" * 10)])  # creates segment 1, ends at 27
    assert calls == []
    log.sync()
    assert calls == [tmp_path]
    log.sync()
    log.append([(1, b"b" * 10)])  # same segment, ends at 46
    log.sync()
    assert calls == [tmp_path]
    log.append([(1, b"c" * 10)])  # rolls to segment 2
    assert log.current_segment == 2
    assert calls == [tmp_path]
    log.sync()
    assert calls == [tmp_path, tmp_path]
    log.sync()
    assert calls == [tmp_path, tmp_path]
    log.delete(1)
    assert calls == [tmp_path] * 3


def test_truncating_a_torn_tail_fsyncs_directory(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    entries = make_records(3)
    write_log(tmp_path, entries)
    path = seg_path(tmp_path, 1)
    os.truncate(path, path.stat().st_size - 2)
    calls: list[Path] = []
    monkeypatch.setattr(_segments, "_fsync_dir", calls.append)
    records, log = reread(tmp_path)
    assert (len(records), log.truncated) == (2, HEADER_BYTES + len(entries[2][1]) - 2)
    assert calls == [tmp_path]


# -- reading back at a position, and aligned segments --------------------------------------


def test_records_are_read_back_at_their_positions(tmp_path: Path) -> None:
    kw = {"segment_bytes": 40}
    entries = [*make_records(5), (3, b"L" * 5000)]  # one larger than a first read
    positions = write_log(tmp_path, entries, **kw)
    reader = _segments.SegmentReader(tmp_path)
    try:
        for position, entry in zip(positions, entries, strict=True):
            assert reader.read(position) == entry
    finally:
        reader.close()


@pytest.mark.parametrize("harm", ["bad crc", "not a record start", "past the end",
                                  "missing segment", "cut short"])
def test_a_record_that_cannot_be_read_back_is_reported(tmp_path: Path, harm: str) -> None:
    entries = make_records(3)
    positions = write_log(tmp_path, entries)
    position = positions[1]
    path = seg_path(tmp_path, 1)
    if harm == "bad crc":
        data = bytearray(path.read_bytes())
        data[position.offset + HEADER_BYTES + 2] ^= 1
        path.write_bytes(bytes(data))
    elif harm == "not a record start":
        position = Position(1, position.offset + 1)
    elif harm == "past the end":
        position = Position(1, path.stat().st_size)
    elif harm == "missing segment":
        position = Position(2, position.offset)
    else:
        os.truncate(path, position.offset + HEADER_BYTES + 1)
    reader = _segments.SegmentReader(tmp_path)
    try:
        with pytest.raises(_segments.RecordUnreadable):
            reader.read(position)
        assert reader.read(positions[0]) == entries[0]  # the reader still works
    finally:
        reader.close()


def test_replicas_started_at_one_serial_write_at_the_same_positions(tmp_path: Path) -> None:
    # Replica a has three segments, b none (it was lost): a fresh segment with the serial
    # above both puts the same records at the same positions on each.
    write_log(tmp_path / "a", make_records(6), segment_bytes=40)
    logs = [open_log(tmp_path / name, segment_bytes=40) for name in ("a", "b")]
    for log in logs:
        list(log.recover())
    assert [log.current_segment for log in logs] == [3, 0]
    assert logs[0].sizes == {int(path.stem): path.stat().st_size
                             for path in (tmp_path / "a").glob("*.seg")}
    serial = max(log.current_segment for log in logs) + 1
    written = []
    for log in logs:
        log.start_segment(serial)
        written.append(log.append(make_records(2, start=10)))
    assert written[0] == written[1] and written[0][0] == Position(4, len(MAGIC))
    with pytest.raises(ValueError):
        logs[1].start_segment(4)  # not above the current one
