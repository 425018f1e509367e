"""Tests for :class:`chatd.backends.embedded.DurableStore`, the persistence actor on two replicas.

Every test runs real stores on real replica directories under ``tmp_path``. A "restart" is
a clean stop (the store's nursery is cancelled) followed by a fresh ``DurableStore`` on the
same directories; damage, torn tails and lost replicas are made by editing the segment
files while the store is stopped. Crashes with SIGKILL are tested elsewhere.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import cbor2
import pytest
import trio
import trio.testing
from records import read_records

from chatd.actors import ActorTable
from chatd.backends import (
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    StoreUnavailable,
)
from chatd.backends.embedded import DurableStore
from chatd.backends.embedded._lock import LOCK_FILE, DirectoryInUse
from chatd.backends.embedded._segments import HEADER_BYTES, SegmentLog
from chatd.clock import now_ms

# Record types of the durable store (chatd/backends/embedded/_durable.py).
MSG, ACK = 1, 2
CK_BEGIN, CK_USER, CK_UNREAD, CK_ENTRY, CK_END, CK_REFS, CK_KEYS = 10, 11, 12, 13, 15, 17, 18

DEADLINE = 10.0  # seconds any single wait in these tests may take
ALL = 1_000_000  # a limit larger than any queue here

Decoded = list[tuple[int, list[Any]]]


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    """The two replica directories of the store under test."""
    return [tmp_path / "r0", tmp_path / "r1"]


@pytest.fixture(autouse=True)
def _store_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``chatd`` records propagate to caplog even if a test configured JSON logging."""
    monkeypatch.setattr(logging.getLogger("chatd"), "propagate", True)


@asynccontextmanager
async def running_store(dirs: Sequence[Path], **kw: Any) -> AsyncIterator[DurableStore]:
    """A DurableStore on ``dirs``, recovered and serving; stopped cleanly on exit."""
    async with trio.open_nursery() as nursery:
        store = DurableStore(ActorTable("n1"), list(dirs), **kw)
        with trio.fail_after(DEADLINE):
            await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


def msg(n: int, to: str, sender: str = "alice", *, body: str | None = None,
        ts: int | None = None) -> Message:
    """Message ``m<n>`` from ``sender`` to ``to``."""
    return Message(f"m{n}", sender, to, body if body is not None else f"body {n} for {to}",
                   ts if ts is not None else now_ms())


class UserState(NamedTuple):
    """Everything a restart must keep about one user."""

    last_seq: int
    queued: int
    pending: tuple[Entry, ...]
    unread: tuple[tuple[int, str, str], ...]


async def snapshot(store: DurableStore, users: Sequence[str]) -> dict[str, UserState]:
    """The observable state of ``users`` in ``store``, comparable with ``==``."""
    unread = {user: tuple(u) for user, _, _, u, _ in store.index.users()}
    return {user: UserState(store.index.last_seq(user), store.queued(user),
                            tuple(await store.pending(user, 0, ALL)), unread.get(user, ()))
            for user in users}


async def submit_all(store: DurableStore, messages: Sequence[Message]) -> list[Entry]:
    """Submit one at a time (one record per batch); the new entries."""
    entries = []
    for message in messages:
        accepted = await store.submit(message)
        assert not accepted.duplicate and accepted.entry is not None
        entries.append(accepted.entry)
    return entries


def summary(receipts: Sequence[tuple[str, Entry]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(sender, status, ids) of receipts returned by ``acknowledge``."""
    out = []
    for sender, entry in receipts:
        assert isinstance(entry.item, ReceiptItem)
        out.append((sender, entry.item.status, entry.item.ids))
    return out


def segment_files(directory: Path) -> list[Path]:
    """The segment files of a replica, in serial order."""
    return sorted(directory.glob("*.seg"))


def segment_bytes_total(directory: Path) -> int:
    return sum(path.stat().st_size for path in segment_files(directory))


def recover_clean(directory: Path) -> Decoded:
    """Recover a stopped replica with a fresh SegmentLog; it must hold no damage."""
    log = SegmentLog(directory)
    try:
        records = [(r.type, cbor2.loads(r.payload)) for r in read_records(log)]
        assert log.damage == []
        assert log.truncated == 0
    finally:
        log.close()
    return records


def record_spans(directory: Path) -> list[tuple[Path, int, int]]:
    """(file, offset, size) of every record of a cleanly stopped replica, in order."""
    log = SegmentLog(directory)
    try:
        spans = [(directory / f"{r.position.segment:020d}.seg", r.position.offset,
                  HEADER_BYTES + len(r.payload)) for r in read_records(log)]
        assert log.damage == [] and log.truncated == 0
    finally:
        log.close()
    return spans


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def checkpoint_entries(records: Decoded) -> dict[str, list[tuple[Any, ...]]]:
    """The queues of the one complete checkpoint in ``records``: user -> [(seq, kind, id)].

    Asserts that ``records`` hold exactly one checkpoint, complete (CK_BEGIN ... CK_END,
    one snapshot LSN) and nothing else before it.
    """
    types = [record_type for record_type, _ in records]
    assert types.count(CK_BEGIN) == 1 and types.count(CK_END) == 1
    begin, end = types.index(CK_BEGIN), types.index(CK_END)
    assert begin == 0 and begin < end
    snap = records[begin][1][0]
    queues: dict[str, list[tuple[Any, ...]]] = {}
    for record_type, fields in records[begin:end + 1]:
        assert fields[0] == snap
        if record_type == CK_ENTRY:
            _, user, seq, kind, *rest = fields
            queues.setdefault(user, []).append((seq, kind, rest[0] if kind == "m" else rest[3]))
    return queues


def expected_queue(state: UserState) -> list[tuple[Any, ...]]:
    """``checkpoint_entries`` as it should read for a user in ``state``."""
    return [(e.seq, "m", e.item.id) if isinstance(e.item, Message) else (e.seq, "r", e.item.ts)
            for e in state.pending]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The structured fields of every captured record of event ``name``."""
    return [dict(getattr(r, "chatd_fields", {})) for r in caplog.records if r.msg == name]


# -- 1. round trip ------------------------------------------------------------------------


async def test_a_second_store_on_the_same_directories_is_refused(dirs: list[Path]) -> None:
    async with running_store(dirs):
        second = DurableStore(ActorTable("n2"), list(dirs))
        with pytest.raises(DirectoryInUse) as info, trio.fail_after(DEADLINE):
            await second.run()
        assert (info.value.directory, info.value.pid) == (dirs[0], os.getpid())
        assert (dirs[0] / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    async with running_store(dirs):  # released when the first one stopped
        pass


async def test_state_round_trips_across_restarts(dirs: list[Path]) -> None:
    users = ["alice", "erin", "bob", "carol", "dave"]
    async with running_store(dirs) as store:
        await submit_all(store, [msg(1, "bob"), msg(2, "bob"), msg(3, "bob"),
                                 msg(1, "bob", "erin"), msg(4, "carol"), msg(5, "carol"),
                                 msg(2, "dave", "erin")])
        # bob: m1, m2 delivered (unread); then read upto 4 from erin only: m3 and e's m1
        # delivered, e's m1 read; m1..m3 stay unread.
        receipts = await store.acknowledge("bob", "delivered", 2)
        assert summary(receipts) == [
            ("alice", "delivered", ("m1", "m2"))]
        receipts = await store.acknowledge("bob", "read", 4, "erin")
        assert summary(receipts) == [
            ("alice", "delivered", ("m3",)), ("erin", "delivered", ("m1",)),
            ("erin", "read", ("m1",))]
        # carol: read upto 1 with no peer; m5 stays queued.
        receipts = await store.acknowledge("carol", "read", 1)
        assert summary(receipts) == [
            ("alice", "delivered", ("m4",)), ("alice", "read", ("m4",))]
        before = await snapshot(store, users)
    assert before["bob"].queued == 0 and before["bob"].unread == (
        (1, "alice", "m1"), (2, "alice", "m2"), (3, "alice", "m3"))
    assert before["carol"].queued == 1 and before["dave"].queued == 1
    assert before["alice"].queued == 4 and before["erin"].queued == 2
    assert all(isinstance(e.item, ReceiptItem) and e.item.by in ("bob", "carol")
               for e in before["alice"].pending + before["erin"].pending)

    async with running_store(dirs) as store:  # restored by replaying the log
        assert await snapshot(store, users) == before
        await store.checkpoint()
    async with running_store(dirs) as store:  # restored from the checkpoint
        assert await snapshot(store, users) == before
        # bob's m1..m3 were delivered before the restarts: reading them now yields the
        # READ receipt for alice, queued after her existing receipts.
        receipts = await store.acknowledge("bob", "read", 3)
        assert len(receipts) == 1
        sender, entry = receipts[0]
        assert sender == "alice" and entry.seq == before["alice"].last_seq + 1
        assert isinstance(entry.item, ReceiptItem)
        assert (entry.item.status, entry.item.by, entry.item.ids) == (
            "read", "bob", ("m1", "m2", "m3"))
        after = await snapshot(store, ["bob"])
        assert after["bob"].unread == ()
        assert await store.acknowledge("bob", "read", 3) == []


# -- 2. idempotency -----------------------------------------------------------------------


@pytest.mark.parametrize("checkpointed", [False, True], ids=["replayed", "checkpointed"])
async def test_idempotency_survives_restart(dirs: list[Path], checkpointed: bool) -> None:
    original = msg(1, "bob", ts=now_ms() - 5000)
    async with running_store(dirs) as store:
        await submit_all(store, [original])
        if checkpointed:
            await store.checkpoint()

    async with running_store(dirs) as store:
        retry = msg(1, "bob", body="a different body", ts=now_ms())
        accepted = await store.submit(retry)
        assert accepted.duplicate and accepted.entry is None
        assert accepted.ts == original.ts
        assert store.queued("bob") == 1 and store.index.last_seq("bob") == 1
        with pytest.raises(IdConflict):
            await store.submit(msg(1, "carol"))
        assert store.queued("carol") == 0 and store.index.last_seq("carol") == 0

        # The same new id submitted by several tasks at once is queued exactly once.
        results = []
        ts = now_ms()

        async def send() -> None:
            results.append(await store.submit(msg(2, "bob", ts=ts)))

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(send)
        assert sorted(r.duplicate for r in results) == [False] + [True] * 7
        assert {r.ts for r in results} == {ts}
        assert store.queued("bob") == 2 and store.index.last_seq("bob") == 2
        pending = await store.pending("bob", 0, ALL)
        assert [e.item.id for e in pending if isinstance(e.item, Message)] == ["m1", "m2"]
        assert pending[0].item == original


async def test_a_replay_past_dedup_max_remembers_the_newest_ids(dirs: list[Path]) -> None:
    """Recovery replays more messages than ``dedup_max``: the newest ids answer ``dup``
    with their ``ts``, the older ones are forgotten (and queue again), as before the
    restart."""
    async with running_store(dirs, dedup_max=4) as store:
        sent = [msg(n, "bob", ts=now_ms() - 100 + n) for n in range(10)]
        await submit_all(store, sent)

    async with running_store(dirs, dedup_max=4) as store:
        assert len(store.index.ids) == 4
        for original in sent[6:]:
            accepted = await store.submit(msg(int(original.id[1:]), "bob", body="again"))
            assert accepted.duplicate and accepted.ts == original.ts
        accepted = await store.submit(msg(5, "bob", body="again"))
        assert not accepted.duplicate
        assert store.queued("bob") == 11


# -- 3. sequence numbers ------------------------------------------------------------------


async def test_sequence_numbers_never_go_back(dirs: list[Path]) -> None:
    async with running_store(dirs) as store:
        await submit_all(store, [msg(n, "bob") for n in range(3)] +
                         [msg(n, "carol") for n in range(3, 5)])
        await store.acknowledge("bob", "read", 3)
        await store.acknowledge("carol", "delivered", 2)
        await store.acknowledge("alice", "delivered", store.index.last_seq("alice"))
        last = {user: store.index.last_seq(user) for user in ("alice", "bob", "carol")}
        assert last == {"alice": 3, "bob": 3, "carol": 2}
        assert store.index.pending_total == 0
        await store.checkpoint()
        assert [len(segment_files(d)) for d in dirs] == [1, 1]
    for directory in dirs:  # the MSG/ACK records are gone: only the checkpoint holds seqs
        records = recover_clean(directory)
        assert {t for t, _ in records} <= {CK_BEGIN, CK_USER, CK_UNREAD, CK_KEYS, CK_END}
        assert checkpoint_entries(records) == {}

    async with running_store(dirs) as store:
        assert {user: store.index.last_seq(user) for user in last} == last
        entry = (await store.submit(msg(10, "bob"))).entry
        assert entry is not None and entry.seq == last["bob"] + 1
        receipts = await store.acknowledge("bob", "delivered", entry.seq)
        assert [(s, e.seq) for s, e in receipts] == [("alice", last["alice"] + 1)]
        entry = (await store.submit(msg(11, "carol"))).entry
        assert entry is not None and entry.seq == last["carol"] + 1


# -- 4. segments are given back ----------------------------------------------------------


@pytest.mark.parametrize("how", ["explicit", "checkpointer"])
async def test_segments_removed_once_all_acknowledged(dirs: list[Path], how: str) -> None:
    # 40 records of ~340 bytes make 4 segments of 4096 bytes: not more, so that the
    # checkpointer's other rule (more than 4 segments) does not compact before the acks.
    interval = 0.05 if how == "checkpointer" else 3600.0
    count = 40
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=interval) as store:
        await submit_all(store, [msg(n, "bob", body=f"{n:04d}" + "x" * 300)
                                 for n in range(count)])
        before = [segment_bytes_total(d) for d in dirs]
        segments = [len(segment_files(d)) for d in dirs]
        assert min(segments) >= 4
        await store.acknowledge("bob", "read", count)
        await store.acknowledge("alice", "delivered", store.index.last_seq("alice"))
        assert store.index.pending_total == 0
        if how == "explicit":
            await store.checkpoint()
        else:
            with trio.fail_after(DEADLINE):
                while not (store.journal is not None and store.journal.stats.checkpoints
                           and all(len(segment_files(d)) == 1 for d in dirs)):
                    await trio.sleep(0.01)
        after = [segment_bytes_total(d) for d in dirs]
        assert [len(segment_files(d)) for d in dirs] == [1, 1]
        print(f"{how}: bytes per replica before {before} in {segments} segments, "
              f"after {after} in 1")
        assert all(a * 10 < b for a, b in zip(after, before, strict=True))
        last_alice = store.index.last_seq("alice")

    async with running_store(dirs, segment_bytes=4096) as store:
        assert store.index.last_seq("bob") == count and store.index.last_seq("alice") == last_alice
        assert store.queued("bob") == 0
        assert (await store.submit(msg(7, "bob"))).duplicate
        entry = (await store.submit(msg(count + 1, "bob"))).entry
        assert entry is not None and entry.seq == count + 1


async def test_checkpoint_of_the_index_keeps_the_items_where_they_are(
        dirs: list[Path]) -> None:
    """The background checkpoint holds where each queued item is, not the item: the
    segments with queued messages are not rewritten, and a restart reads them there."""
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=3600.0) as store:
        await submit_all(store, [msg(n, "bob", body=f"{n:04d}" + "y" * 300)
                                 for n in range(30)])
        await store.acknowledge("bob", "read", 10)  # alice gets receipts; m10.. stay
        before = await snapshot(store, ["alice", "bob"])
        files = {path.name: path.read_bytes() for path in segment_files(dirs[0])}
        await store.checkpoint(rewrite=False)
        # Every segment that held a queued item is still there, byte for byte.
        for name, data in files.items():
            if (dirs[0] / name).exists():
                assert (dirs[0] / name).read_bytes()[:len(data)] == data
        assert (dirs[0] / min(files)).exists()  # bob's m10 is in the first segment
    for directory in dirs:
        records = recover_clean(directory)
        types = [t for t, _ in records]
        assert CK_REFS in types and CK_ENTRY not in types
    async with running_store(dirs, segment_bytes=4096) as store:
        assert await snapshot(store, ["alice", "bob"]) == before


async def test_changes_written_while_a_checkpoint_is_encoded_survive_a_restart(
        dirs: list[Path]) -> None:
    """The background checkpoint is copied at once and encoded while the store goes on:
    the sends and acknowledgements written meanwhile come after the LSN it covers, and a
    restart replays them, even once the segments before the checkpoint were deleted."""
    async with running_store(dirs, segment_bytes=2048, checkpoint_interval=3600.0) as store:
        users = [f"u{n:03d}" for n in range(120)]  # a record or more each to encode
        await submit_all(store, [msg(n, user) for n, user in enumerate(users)])
        await store.acknowledge("u000", "delivered", 1)
        assert store.journal is not None
        written_before = store.journal.applied
        checkpoint_done = trio.Event()
        during: list[int] = []

        async def checkpoint() -> None:
            await store.checkpoint(rewrite=False)
            checkpoint_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint)
            for n in range(5):  # while it encodes: each is a batch of its own
                await submit_all(store, [msg(1000 + n, "late", body="z" * 600)])
                if not checkpoint_done.is_set():
                    during.append(n)
            await store.acknowledge("u001", "read", 1)
        assert during, "no write was made while the checkpoint was being encoded"
        # The checkpoint covers what was applied when it was copied, not the later writes.
        ends = [fields for t, fields in recover_clean(dirs[0]) if t == CK_BEGIN]
        assert ends[-1][0] == written_before
        # Its boundary is no later than the segment of the first write it does not cover.
        first_late = store.index.ref("late", 1)
        assert first_late is not None and store.segments.checkpoint <= first_late[1]
        await store.compact()  # deletes what the boundary allows
        before = await snapshot(store, [*users[:3], "late", "alice"])
    async with running_store(dirs, segment_bytes=2048) as store:
        assert await snapshot(store, [*users[:3], "late", "alice"]) == before
        assert [e.item.id for e in await store.pending("late", 0, ALL)  # type: ignore[union-attr]
                ] == [f"m{1000 + n}" for n in range(5)]


async def test_compaction_copies_queued_items_forward_and_deletes_dead_segments(
        dirs: list[Path]) -> None:
    # One message in four stays queued (bob's); the rest are acknowledged, so that every
    # segment of 4096 bytes is mostly dead.
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=3600.0) as store:
        await submit_all(store, [msg(n, "bob" if n % 4 == 0 else "carol", body="y" * 300)
                                 for n in range(80)])
        await store.acknowledge("carol", "delivered", store.index.last_seq("carol"))
        before = await snapshot(store, ["alice", "bob", "carol"])
        segments = [len(segment_files(d)) for d in dirs]
        assert min(segments) >= 6
        await store.checkpoint(rewrite=False)  # the old segments now hold only bob's items
        await store.compact()
        # Those in the checkpoint's segment stay there: it may not be deleted yet.
        assert 15 <= store.maintenance.moved < 20 and store.maintenance.deleted >= 5
        after = [len(segment_files(d)) for d in dirs]
        print(f"segments per replica: {segments} before compaction, {after} after")
        assert after[0] == after[1] <= 3
        assert await snapshot(store, ["alice", "bob", "carol"]) == before
    # The items are read where MOVE records put them, replayed after the checkpoint that
    # still names the deleted segments.
    async with running_store(dirs, segment_bytes=4096) as store:
        assert await snapshot(store, ["alice", "bob", "carol"]) == before
        assert [e.item.id for e in before["bob"].pending if isinstance(e.item, Message)] == [
            f"m{n}" for n in range(0, 80, 4)]


async def test_the_background_compacts_a_long_log_with_messages_pending(
        dirs: list[Path]) -> None:
    # Traffic goes on: carol acknowledges hers, bob never does (one message in four). The
    # background checkpoints, copies bob's messages out of the old segments, deletes them.
    sent = 0
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=0.05) as store:
        with trio.fail_after(DEADLINE):
            while store.maintenance.deleted < 10 or not store.maintenance.moved:
                await submit_all(store, [msg(n, "bob" if n % 4 == 0 else "carol",
                                             body="y" * 300) for n in range(sent, sent + 8)])
                sent += 8
                await store.acknowledge("carol", "delivered", store.index.last_seq("carol"))
                await store.acknowledge("alice", "delivered", store.index.last_seq("alice"))
        before = await snapshot(store, ["alice", "bob"])
        written = store.logs[0].current_segment
    assert before["bob"].queued == sent // 4
    for directory in dirs:  # fewer than half the segments written remain
        assert len(segment_files(directory)) * 2 < written, written
    async with running_store(dirs, segment_bytes=4096) as store:
        assert await snapshot(store, ["alice", "bob"]) == before


async def test_compaction_copies_at_most_compact_rate_bytes_a_second(
        dirs: list[Path]) -> None:
    rate = 16 * 1024
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=3600.0,
                             compact_rate=rate) as store:
        await submit_all(store, [msg(n, "bob" if n % 4 == 0 else "carol", body="y" * 300)
                                 for n in range(80)])
        await store.acknowledge("carol", "delivered", store.index.last_seq("carol"))
        await store.checkpoint(rewrite=False)
        started = trio.current_time()
        await store.compact()
        elapsed = trio.current_time() - started
    moved = store.maintenance.moved_bytes
    assert moved >= 20 * 300
    assert elapsed >= moved / rate, (elapsed, moved)


# -- 5. repair from the other replica -----------------------------------------------------


async def _fill(dirs: list[Path], count: int = 11) -> dict[str, UserState]:
    """A store with ``count`` messages to bob and carol, one record each; its state."""
    async with running_store(dirs) as store:
        await submit_all(store, [msg(n, "bob" if n % 2 else "carol") for n in range(count)])
        return await snapshot(store, ["bob", "carol"])


async def _assert_repaired(dirs: list[Path], before: dict[str, UserState]) -> None:
    """After the repair, both replicas hold a clean, complete checkpoint of ``before``,
    and a further restart still shows ``before``."""
    for directory in dirs:
        records = recover_clean(directory)
        assert checkpoint_entries(records) == {
            user: expected_queue(state) for user, state in before.items()}
    async with running_store(dirs) as store:
        assert await snapshot(store, ["bob", "carol"]) == before


async def test_damaged_record_repaired_from_other_replica(
        dirs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    before = await _fill(dirs)
    spans = record_spans(dirs[0])
    path, offset, size = spans[len(spans) // 2]
    flip_byte(path, offset + size // 2)

    async with running_store(dirs) as store:
        assert await snapshot(store, ["bob", "carol"]) == before
    damaged = events(caplog, "replica_damaged")
    assert len(damaged) == 1
    assert damaged[0]["error"] == "replica_damaged"
    assert damaged[0]["replica"] == str(dirs[0]) and damaged[0]["start"] == offset
    assert events(caplog, "replicas_repaired")
    assert not events(caplog, "records_lost")
    await _assert_repaired(dirs, before)


@pytest.mark.parametrize("keep", [1, 5, 9, 20, -1])
async def test_torn_tail_on_one_replica_loses_nothing(
        dirs: list[Path], caplog: pytest.LogCaptureFixture, keep: int) -> None:
    before = await _fill(dirs)
    path, offset, size = record_spans(dirs[0])[-1]
    cut = offset + (keep if keep >= 0 else size + keep)
    os.truncate(path, cut)

    async with running_store(dirs) as store:
        assert await snapshot(store, ["bob", "carol"]) == before
    torn = events(caplog, "torn_tail_truncated")
    assert [(t["replica"], t["bytes"]) for t in torn] == [(str(dirs[0]), cut - offset)]
    assert not events(caplog, "replica_damaged")
    await _assert_repaired(dirs, before)


@pytest.mark.parametrize("record_type", [CK_ENTRY, CK_USER], ids=["CK_ENTRY", "CK_USER"])
async def test_damaged_checkpoint_record_repaired_from_other_replica(
        dirs: list[Path], caplog: pytest.LogCaptureFixture, record_type: int) -> None:
    async with running_store(dirs) as store:
        await submit_all(store, [msg(n, "bob") for n in range(5)] + [msg(9, "dave")])
        await store.acknowledge("dave", "delivered", 1)  # dave: last_seq 1, queue empty
        await store.checkpoint()
        before = await snapshot(store, ["alice", "bob", "dave"])
    records = recover_clean(dirs[0])
    spans = record_spans(dirs[0])
    candidates = [span for span, (t, fields) in zip(spans, records, strict=True)
                  if t == record_type and fields[1] == ("bob" if t == CK_ENTRY else "dave")]
    path, offset, size = candidates[len(candidates) // 2]
    flip_byte(path, offset + size // 2)

    async with running_store(dirs) as store:
        assert events(caplog, "replica_damaged")
        assert await snapshot(store, ["alice", "bob", "dave"]) == before


# -- 6. a lost replica --------------------------------------------------------------------


@pytest.mark.parametrize("lost", [0, 1])
async def test_deleted_replica_repopulated(
        dirs: list[Path], caplog: pytest.LogCaptureFixture, lost: int) -> None:
    before = await _fill(dirs)
    shutil.rmtree(dirs[lost])

    async with running_store(dirs) as store:
        assert await snapshot(store, ["bob", "carol"]) == before
        assert all(segment_files(d) for d in dirs)
    assert events(caplog, "replicas_repaired")
    await _assert_repaired(dirs, before)


# -- 7. the same torn tail on both replicas -----------------------------------------------


async def test_torn_tail_on_both_replicas(
        dirs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    # The last message stands for a write whose fsync completed on neither replica before
    # a crash: its submit was never acknowledged. The earlier ones (seq 1-4) were.
    async with running_store(dirs) as store:
        entries = await submit_all(store, [msg(n, "bob") for n in range(5)])
        before = await snapshot(store, ["bob"])
    acknowledged = max(e.seq for e in entries[:-1])
    for directory in dirs:
        path, offset, size = record_spans(directory)[-1]
        os.truncate(path, offset + size // 2)

    async with running_store(dirs) as store:
        assert len(events(caplog, "torn_tail_truncated")) == 2
        assert not events(caplog, "records_lost")
        assert tuple(await store.pending("bob", 0, ALL)) == before["bob"].pending[:-1]
        assert store.index.last_seq("bob") == acknowledged
        # The lost id is free again, so the sender's retry is a new message.
        retried = await store.submit(msg(4, "bob", body="retried"))
        fresh = await store.submit(msg(5, "bob"))
        assert retried.entry is not None and fresh.entry is not None
        assert acknowledged < retried.entry.seq < fresh.entry.seq
        after = await snapshot(store, ["bob"])
    async with running_store(dirs) as store:
        assert await snapshot(store, ["bob"]) == after
    for directory in dirs:
        recover_clean(directory)


# -- 8. a failed replica ------------------------------------------------------------------


async def test_failed_replica_stops_acknowledging(
        dirs: list[Path], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    failing = dirs[1].resolve()

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(failing):
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)

    async with running_store(dirs) as store:
        entries = await submit_all(store, [msg(n, "bob") for n in range(3)])
        with monkeypatch.context() as patch:
            patch.setattr("chatd.backends.embedded._segments.os.fsync", fsync)
            with pytest.raises(StoreUnavailable):
                await store.submit(msg(3, "bob"))
        assert os.fsync is real_fsync
        with pytest.raises(StoreUnavailable):
            await store.submit(msg(4, "bob"))
        with pytest.raises(StoreUnavailable):
            await store.submit(msg(5, "carol"))
        with pytest.raises(StoreUnavailable):
            await store.acknowledge("bob", "delivered", 1)
        with pytest.raises(StoreUnavailable):
            await store.checkpoint()
        assert store.journal is not None and store.journal.failed
        failed = events(caplog, "replica_failed")
        assert len(failed) == 1 and failed[0]["error"] == "replica_failed"
        assert str(dirs[1]) in failed[0]["reason"]
        assert tuple(await store.pending("bob", 0, ALL)) == tuple(entries)
        assert store.queued("carol") == 0 and store.index.last_seq("bob") == 3


async def test_failed_replica_during_background_checkpoint_keeps_store_up(
        dirs: list[Path], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    # Only the checkpoint's fresh segment on replica 1 fails: the acks themselves commit.
    fresh_segment = (dirs[1] / f"{2:020d}.seg").resolve()

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == fresh_segment:
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)

    monkeypatch.setattr("chatd.backends.embedded._segments.os.fsync", fsync)
    async with running_store(dirs) as store:
        await submit_all(store, [msg(n, "bob") for n in range(3)])
        assert len(segment_files(dirs[1])) == 1
        await store.acknowledge("bob", "delivered", 3)
        await store.acknowledge("alice", "delivered", 1)  # queues empty: checkpointer runs
        with trio.fail_after(DEADLINE):
            while not events(caplog, "replica_failed"):
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()  # the checkpointer has seen it fail
        with pytest.raises(StoreUnavailable):
            await store.submit(msg(9, "bob"))
        assert store.queued("bob") == 0


# -- 9. group commit ----------------------------------------------------------------------


async def test_concurrent_submits_share_fsyncs(dirs: list[Path]) -> None:
    count = 200
    async with running_store(dirs) as store:
        assert store.journal is not None
        stats = store.journal.stats
        start = (stats.batches, stats.fsyncs, stats.records)
        accepted = {}

        async def send(n: int) -> None:
            accepted[n] = await store.submit(msg(n, f"user{n}"))

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for n in range(count):
                    nursery.start_soon(send, n)
        batches, fsyncs = stats.batches - start[0], stats.fsyncs - start[1]
        print(f"{count} concurrent submits: {batches} batches, {fsyncs} fsyncs")
        assert stats.records - start[2] == count
        assert 1 <= batches <= 20 and fsyncs == 2 * batches
        assert all(a.entry is not None and a.entry.seq == 1 for a in accepted.values())
        assert all(store.index.last_seq(f"user{n}") == 1 for n in range(count))

