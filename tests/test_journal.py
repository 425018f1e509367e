"""Group commit in the journal, on real segment files in a temporary directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from records import read_records

from chatd.actors import ActorTable
from chatd.backends import StoreUnavailable
from chatd.backends.embedded._journal import Checkpoint, Journal
from chatd.backends.embedded._segments import (
    HEADER_BYTES,
    MAGIC,
    Block,
    Position,
    SegmentLog,
    SegmentReader,
)

Event = tuple[str, int, tuple[str, ...]]

DEADLINE = 10.0  # seconds any single wait may take


class TracedLog(SegmentLog):
    """A segment log that records when records are appended and when fsyncs start/end."""

    def __init__(self, directory: Path, replica: int, events: list[Event],
                 **kw: Any) -> None:
        super().__init__(directory, **kw)
        self.replica = replica
        self.events = events

    def append_block(self, block: Block) -> Position:
        start = super().append_block(block)
        payloads = []
        for offset in block.offsets:
            size = int.from_bytes(block.data[offset:offset + 4])
            payload = block.data[offset + HEADER_BYTES:offset + HEADER_BYTES + size]
            payloads.append(cbor2.loads(payload)[1])
        self.events.append(("appended", self.replica, tuple(payloads)))
        return start

    def sync(self) -> None:
        self.events.append(("sync_start", self.replica, ()))
        super().sync()
        self.events.append(("sync_end", self.replica, ()))


def open_logs(tmp_path: Path, events: list[Event]) -> list[TracedLog]:
    logs = [TracedLog(tmp_path / f"r{i}", i, events) for i in range(2)]
    for log in logs:
        assert list(log.recover()) == []
    return logs


async def write_concurrently(journal: Journal, count: int, events: list[Event]) -> None:
    async def writer(n: int) -> None:
        payload = f"record {n}"
        await journal.write([(1, [payload])])
        events.append(("released", -1, (payload,)))

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(writer, n)


async def test_concurrent_writers_share_fsyncs(tmp_path: Path) -> None:
    events: list[Event] = []
    logs = open_logs(tmp_path, events)
    journal = Journal(ActorTable("n1"), logs)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            await write_concurrently(journal, 200, events)
        nursery.cancel_scope.cancel()
    stats = journal.stats
    assert stats.records == 200
    assert stats.fsyncs == 2 * stats.batches
    assert stats.batches <= 20, f"{stats.batches} batches for 200 concurrent writers"
    for log in logs:
        log.close()
        reread = SegmentLog(log.directory)
        records = [cbor2.loads(r.payload) for r in read_records(reread)]
        assert sorted(payload for _, payload in records) == sorted(
            f"record {n}" for n in range(200))
        # Every record has its own LSN, the same on both replicas.
        assert sorted(lsn for lsn, _ in records) == list(range(1, 201))


class GatedLog(SegmentLog):
    """A segment log whose fsync waits, in its worker thread, for the test to open a gate."""

    def __init__(self, directory: Path, gate: threading.Event,
                 token: trio.lowlevel.TrioToken, in_sync: trio.Event) -> None:
        super().__init__(directory)
        self.gate = gate
        self.token = token
        self.in_sync = in_sync

    def sync(self) -> None:
        trio.from_thread.run_sync(self.in_sync.set, trio_token=self.token)
        if not self.gate.wait(DEADLINE):
            raise AssertionError("the gate was never opened")
        super().sync()


async def test_a_write_under_way_when_the_journal_is_cancelled_still_completes(
        tmp_path: Path) -> None:
    """Cancelling the journal (the node shutting down) while a batch is being fsync'd waits
    for the fsync and acknowledges the batch: a write once started runs to its end."""
    gate, in_sync = threading.Event(), trio.Event()
    token = trio.lowlevel.current_trio_token()
    logs = [GatedLog(tmp_path / f"r{i}", gate, token, in_sync) for i in range(2)]
    for log in logs:
        assert list(log.recover()) == []
    journal = Journal(ActorTable("n1"), logs)
    acknowledged = trio.Event()

    async def writer() -> None:
        await journal.write([(1, ["under way"])])
        acknowledged.set()

    stopping = trio.CancelScope()

    async def journal_until_cancelled(task_status: trio.TaskStatus[Journal]) -> None:
        with stopping:
            await journal.run(task_status=task_status)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(journal_until_cancelled)
            nursery.start_soon(writer)
            await in_sync.wait()
            stopping.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not acknowledged.is_set()
            gate.set()
            await acknowledged.wait()
    for log in logs:
        log.close()
        assert [cbor2.loads(r.payload)[1] for r in read_records(SegmentLog(log.directory))] == [
            "under way"]


async def test_no_writer_is_released_before_an_fsync_that_started_after_its_write(
        tmp_path: Path) -> None:
    events: list[Event] = []
    journal = Journal(ActorTable("n1"), open_logs(tmp_path, events))
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            await write_concurrently(journal, 100, events)
        nursery.cancel_scope.cancel()

    for payload in (f"record {n}" for n in range(100)):
        released = events.index(("released", -1, (payload,)))
        for replica in (0, 1):
            appended = next(i for i, (kind, r, payloads) in enumerate(events)
                            if kind == "appended" and r == replica and payload in payloads)
            # A sync of this replica starts after the append and ends before the release.
            starts = [i for i, (kind, r, _) in enumerate(events)
                      if kind == "sync_start" and r == replica and appended < i < released]
            assert any(("sync_end", replica, ()) in events[start:released]
                       for start in starts), (payload, replica)


async def test_a_failed_fsync_stops_acknowledging_for_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Event] = []
    logs = open_logs(tmp_path, events)
    journal = Journal(ActorTable("n1"), logs)
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_failing_once_on_replica_1(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/r1/" in path and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            await journal.write([(1, ["before"])])
            monkeypatch.setattr("chatd.backends.embedded._segments.os.fsync",
                                fsync_failing_once_on_replica_1)
            with pytest.raises(StoreUnavailable):
                await journal.write([(1, ["during"])])
            assert journal.failed is not None
            # The fsync would succeed now; the journal still refuses, without retrying.
            with pytest.raises(StoreUnavailable):
                await journal.write([(1, ["after"])])
        nursery.cancel_scope.cancel()
    assert calls["n"] == 1
    assert logs[1].failed is not None and logs[0].failed is None


async def test_apply_is_given_where_each_record_landed_the_same_on_both(
        tmp_path: Path) -> None:
    events: list[Event] = []
    logs = open_logs(tmp_path, events)
    journal = Journal(ActorTable("n1"), logs)
    placed: dict[str, list[Position]] = {}

    async def writer(name: str, count: int) -> None:
        await journal.write([(1, [f"{name}-{n}"]) for n in range(count)],
                            lambda positions: placed.__setitem__(name, positions))

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as writers:
                for name, count in (("a", 3), ("b", 1), ("c", 2)):
                    writers.start_soon(writer, name, count)
        nursery.cancel_scope.cancel()
    for log in logs:
        log.close()
        reader = SegmentReader(log.directory)
        try:
            for name, positions in placed.items():
                assert [cbor2.loads(reader.read(position)[1])[1] for position in positions] == [
                    f"{name}-{n}" for n in range(len(positions))]
        finally:
            reader.close()


async def test_a_fresh_checkpoint_starts_one_serial_on_both_and_deletes_the_older(
        tmp_path: Path) -> None:
    events: list[Event] = []
    logs = open_logs(tmp_path, events)
    # Replica 0 has rolled further than replica 1 (as after replica 1 was lost and rebuilt).
    for _ in range(3):
        logs[0].start_segment()
    journal = Journal(ActorTable("n1"), logs)
    placed: list[Position] = []
    boundaries: list[int] = []

    def checkpointed(positions: list[Position], boundary: int) -> None:
        placed.extend(positions)
        boundaries.append(boundary)

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            await journal.checkpoint(lambda snap: Checkpoint(
                snap, 1, [(15, cbor2.dumps([snap, 0]))], True, checkpointed))
            await journal.write([(1, ["after"])], placed.extend)
        nursery.cancel_scope.cancel()
    # Nothing was written after its snap: the fresh segment is the boundary.
    assert [position.segment for position in placed] == [4, 4]
    assert boundaries == [4]
    assert [log.segments() for log in logs] == [[4], [4]]
    reader = SegmentReader(tmp_path / "r0")
    try:
        assert cbor2.loads(reader.read(Position(4, len(MAGIC)))[1]) == [0, 4]
    finally:
        reader.close()


async def test_a_checkpoint_built_beforehand_keeps_the_changes_written_after_it(
        tmp_path: Path) -> None:
    events: list[Event] = []
    logs = [TracedLog(tmp_path / f"r{i}", i, events, segment_bytes=40) for i in range(2)]
    for log in logs:
        assert list(log.recover()) == []
    journal = Journal(ActorTable("n1"), logs)
    boundaries: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            await journal.write([(1, ["x" * 30, 1])])
            await journal.write([(1, ["x" * 30, 2])])
            snap, boundary = journal.applied, logs[0].current_segment
            assert (snap, boundary) == (2, 2)
            # Written while the checkpoint is being built: not covered by it.
            await journal.write([(1, ["x" * 30, 3])])
            await journal.checkpoint(Checkpoint(
                snap, boundary, [(15, cbor2.dumps([snap, 0]))], True,
                lambda positions, kept: boundaries.append(kept)))
        nursery.cancel_scope.cancel()
    assert boundaries == [2]
    # Segment 1 held only changes up to snap; 2 and 3 hold the one after it.
    assert [log.segments() for log in logs] == [[2, 3, 4]] * 2
    reader = SegmentReader(tmp_path / "r0")
    try:
        assert cbor2.loads(reader.read(Position(4, len(MAGIC)))[1]) == [2, 2]
    finally:
        reader.close()


async def test_segments_are_deleted_from_both_replicas(tmp_path: Path) -> None:
    events: list[Event] = []
    logs = [TracedLog(tmp_path / f"r{i}", i, events, segment_bytes=40) for i in range(2)]
    for log in logs:
        assert list(log.recover()) == []
    journal = Journal(ActorTable("n1"), logs)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10):
            for n in range(4):
                await journal.write([(1, ["x" * 30, n])])
            assert [log.segments() for log in logs] == [[1, 2, 3, 4]] * 2
            await journal.delete([1, 3])
        nursery.cancel_scope.cancel()
    assert [log.segments() for log in logs] == [[2, 4]] * 2


async def test_a_replica_whose_records_land_elsewhere_fails(tmp_path: Path) -> None:
    events: list[Event] = []
    logs = open_logs(tmp_path, events)
    logs[1].start_segment(2)  # replica 1 appends to a segment replica 0 will not have
    journal = Journal(ActorTable("n1"), logs)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        with trio.fail_after(10), pytest.raises(StoreUnavailable):
            await journal.write([(1, ["diverged"])])
        nursery.cancel_scope.cancel()
    assert journal.failed is not None and str(logs[1].directory) in journal.failed
