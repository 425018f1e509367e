"""The durable store's replica operations (``put``, ``acknowledge_only``, ``replace``) on disk.

In a cluster, a node's :class:`DurableStore` is one replica of other users' queues: the
leader of a queue writes numbered entries to it with ``put``, acknowledgements with
``acknowledge_only`` (the receipts go where the senders' queues live), and a merge sets a
queue anew with ``replace`` (records ``PUT``, ``REPLACE``, ``UNREAD``, ``KNOWN``). Each test
runs real stores on real replica directories under ``tmp_path``, as tests/test_durable.py
does: a restart is a clean stop and a fresh store on the same directories, which recovers
by replaying the log, or from a checkpoint after ``store.checkpoint()``. The state compared
across restarts is what replicas exchange: ``index.export`` of the users.

- ``put`` stores entries at their numbers and skips an entry whose number is taken or
  acknowledged, live and when the log is replayed;
- ``acknowledge_only`` returns the receipts and queues none; the acknowledgement rises to
  what the user acknowledged, also past the last entry, but never past ``last_seq``;
- ``replace`` of several users, with unread and remembered ids past the 1000 per record,
  leaves the same export before and after a restart, and after a checkpoint;
- a torn final batch: a torn ``put`` recovers the entries before the cut and nothing else
  changes; with one replica torn, the other's copy restores the whole batch.

A torn tail is made as in tests/test_durable.py, by truncating the segment files of a
stopped store in the middle of a record of its last batch: the write was cut by a crash,
and its caller was never told it succeeded.

A ``replace`` torn on both replicas is applied whole or not at all (the queue it would
have replaced stays), and recovery rebuilds a replaced user's remembered ids as the replace
set them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

from chatd.actors import ActorTable
from chatd.clock import now_ms
from chatd.store import DurableStore, Entry, Message, ReceiptItem, UserState
from chatd.store._segments import HEADER_BYTES, SegmentLog

# Record types of the durable store (chatd/store/_durable.py).
REPLACE, UNREAD, KNOWN = 4, 5, 6
CK_BEGIN = 10

DEADLINE = 10.0  # seconds any single wait in these tests may take
CHUNK = 1000  # ids per UNREAD/KNOWN record (chatd.store._durable._CHUNK)
EMPTY = UserState(0, 0, (), (), ())


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    """The two replica directories of the store under test."""
    return [tmp_path / "r0", tmp_path / "r1"]


@asynccontextmanager
async def running_store(dirs: Sequence[Path]) -> AsyncIterator[DurableStore]:
    """A DurableStore on ``dirs``, recovered and serving; stopped cleanly on exit."""
    async with trio.open_nursery() as nursery:
        store = DurableStore(ActorTable("n1"), list(dirs), checkpoint_interval=3600.0)
        with trio.fail_after(DEADLINE):
            await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


def message(n: int, to: str, sender: str = "alice", ts: int | None = None) -> Message:
    return Message(f"m{n}", sender, to, f"body {n}", ts if ts is not None else now_ms())


def receipt(n: int, by: str = "dave") -> ReceiptItem:
    return ReceiptItem("delivered", by, (f"r{n}a", f"r{n}b"), now_ms())


def exported(store: DurableStore, users: Sequence[str]) -> dict[str, UserState]:
    return store.index.export(list(users))


def seqs(state: UserState) -> list[int]:
    return [entry.seq for entry in state.entries]


def records(directory: Path) -> list[tuple[int, list[Any], Path, int, int]]:
    """(type, fields, file, offset, size) of every record of a stopped replica, in order."""
    log = SegmentLog(directory)
    try:
        found = [(r.type, cbor2.loads(r.payload),
                  directory / f"{r.position.segment:020d}.seg", r.position.offset,
                  HEADER_BYTES + len(r.payload)) for r in log.recover()]
        assert log.damage == [] and log.truncated == 0
    finally:
        log.close()
    return found


def tear(directory: Path, count: int, keep: int) -> None:
    """Cut a stopped replica whose last batch was ``count`` records in the middle of the
    batch's record ``keep`` (from 0), as a crash during the batch's write would."""
    found = records(directory)
    batch = found[-count:]
    assert all(t < CK_BEGIN for t, *_ in batch), "the last batch is not the one expected"
    assert len({fields[0] for _, fields, *_ in batch}) == count, "LSNs not distinct"
    _, _, path, offset, size = batch[keep]
    assert path == found[-1][2], "the batch must be the tail of the last segment"
    os.truncate(path, offset + size // 2)


# -- put ----------------------------------------------------------------------------------


async def test_put_stores_entries_at_their_numbers_and_skips_repeats(dirs: list[Path]
                                                                     ) -> None:
    m1, m2, m3 = message(1, "bob"), message(2, "bob", "carol"), message(3, "bob")
    first = [Entry(1, m1), Entry(2, receipt(1)), Entry(5, m2)]
    async with running_store(dirs) as store:
        await store.put("bob", first)
        state = exported(store, ["bob"])["bob"]
        assert state.entries == tuple(first)
        assert state.last_seq == 5 and state.acked == 0
        assert {(s, i) for s, i, _ in state.known} == {("alice", "m1"), ("carol", "m2")}

        # A repeated replication changes nothing: the same entries, again and twice in
        # one call, and another item under a number already taken.
        await store.put("bob", [*first, first[0], Entry(2, m3)])
        assert exported(store, ["bob"])["bob"] == state
        assert store.queued("bob") == 3
        assert ("alice", "m3") not in store.index.ids, "a skipped message's id was remembered"

        # An entry at an acknowledged number is skipped; one above it is queued.
        assert await store.acknowledge_only("bob", "delivered", 2, None)
        await store.put("bob", [Entry(2, m3), Entry(1, message(4, "bob"))])
        assert seqs(exported(store, ["bob"])["bob"]) == [5]
        await store.put("bob", [Entry(3, m3)])
        before = exported(store, ["bob", "alice", "carol"])
        assert seqs(before["bob"]) == [3, 5] and before["bob"].acked == 2
        assert before["alice"] == before["carol"] == EMPTY, "put queued something elsewhere"

    async with running_store(dirs) as store:  # replayed from the log
        assert exported(store, ["bob", "alice", "carol"]) == before
        assert list(await store.pending("bob", 0, 100)) == list(before["bob"].entries)
        await store.put("bob", [Entry(5, m2), Entry(3, m3)])  # still recognised as repeats
        assert exported(store, ["bob", "alice", "carol"]) == before
        await store.checkpoint()
    async with running_store(dirs) as store:  # restored from the checkpoint
        assert exported(store, ["bob", "alice", "carol"]) == before


# -- acknowledge_only ----------------------------------------------------------------------


def receipts_summary(receipts: Sequence[tuple[str, ReceiptItem]]
                     ) -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [(sender, item.status, item.by, item.ids) for sender, item in receipts]


async def test_acknowledge_only_returns_receipts_and_queues_none(dirs: list[Path]) -> None:
    entries = [Entry(1, message(1, "bob")), Entry(2, message(2, "bob", "carol")),
               Entry(3, receipt(3, "erin")), Entry(4, message(4, "bob"))]
    async with running_store(dirs) as store:
        await store.put("bob", entries)
        receipts = await store.acknowledge_only("bob", "delivered", 2, None)
        assert receipts_summary(receipts) == [("alice", "delivered", "bob", ("m1",)),
                                              ("carol", "delivered", "bob", ("m2",))]
        assert all(store.queued(u) == 0 and store.index.last_seq(u) == 0
                   for u in ("alice", "carol")), "the receipts were queued here"
        assert store.index.acked("bob") == 2 and store.queued("bob") == 2

        # read up to 4 from alice: delivers 3 (a receipt: no receipt for it) and 4, and
        # reads alice's delivered messages; carol's m2 stays unread.
        receipts = await store.acknowledge_only("bob", "read", 4, "alice")
        assert receipts_summary(receipts) == [("alice", "delivered", "bob", ("m4",)),
                                              ("alice", "read", "bob", ("m1", "m4"))]
        state = exported(store, ["bob"])["bob"]
        assert state.entries == () and state.acked == 4
        assert state.unread == ((2, "carol", "m2"),)

        # Nothing left to acknowledge: no receipts, and nothing written.
        assert store.journal is not None
        written = store.journal.stats.records
        assert await store.acknowledge_only("bob", "delivered", 3, None) == []
        assert await store.acknowledge_only("bob", "read", 4, "alice") == []
        assert store.journal.stats.records == written
        # Past the last number, the watermark stops at the last number.
        assert await store.acknowledge_only("bob", "delivered", 40, None) == []
        assert store.index.acked("bob") == 4

        # Numbers with no entry (a replica that missed writes): the watermark still rises
        # to what the user acknowledged, and no further than the last number.
        await store.put("bob", [Entry(9, message(9, "bob"))])
        assert await store.acknowledge_only("bob", "delivered", 7, None) == []
        assert store.index.acked("bob") == 7 and store.queued("bob") == 1
        await store.put("bob", [Entry(6, message(6, "bob")), Entry(8, message(8, "bob"))])
        assert seqs(exported(store, ["bob"])["bob"]) == [8, 9]
        receipts = await store.acknowledge_only("bob", "delivered", 100, None)
        assert receipts_summary(receipts) == [("alice", "delivered", "bob", ("m8", "m9"))]
        assert store.index.acked("bob") == 9 == store.index.last_seq("bob")
        await store.put("bob", [Entry(10, message(10, "bob"))])  # keeps a queue pending
        before = exported(store, ["bob", "alice", "carol", "erin"])
        assert before["bob"].unread == ((2, "carol", "m2"), (8, "alice", "m8"),
                                        (9, "alice", "m9"))

    async with running_store(dirs) as store:  # replayed from the log
        assert exported(store, ["bob", "alice", "carol", "erin"]) == before
        await store.checkpoint()
    async with running_store(dirs) as store:  # restored from the checkpoint
        assert exported(store, ["bob", "alice", "carol", "erin"]) == before
        # The unread messages still produce their READ receipts.
        receipts = await store.acknowledge_only("bob", "read", 9, None)
        assert receipts_summary(receipts) == [("carol", "read", "bob", ("m2",)),
                                              ("alice", "read", "bob", ("m8", "m9"))]


# -- replace ------------------------------------------------------------------------------


def large_state(user: str, *, base: int, pending: int, unread: int, known: int) -> UserState:
    """A merged state of ``user``: ``unread`` delivered messages under the acknowledgement,
    ``pending`` entries above it (every seventh a receipt), ``known`` ids remembered."""
    ts = now_ms()
    acked = base + unread
    entries = tuple(
        Entry(acked + i, receipt(i, by=f"{user}-peer") if i % 7 == 0
              else Message(f"{user}-p{i}", f"s{i % 5}", user, f"pending {i}", ts))
        for i in range(1, pending + 1))
    unread_ids = tuple((base + i, f"s{i % 5}", f"{user}-u{i}") for i in range(1, unread + 1))
    known_ids = tuple((f"s{i % 5}", f"{user}-u{i}", ts) for i in range(1, known + 1))
    known_ids += tuple((e.item.sender, e.item.id, ts) for e in entries
                       if isinstance(e.item, Message))
    return UserState(acked + pending + 3, acked, entries, unread_ids, known_ids)


async def test_replace_of_large_states_survives_restart_and_checkpoint(
        dirs: list[Path]) -> None:
    users = ["u0", "u1", "u2", "carol", "dave"]
    ts = now_ms()
    states = {
        "u0": large_state("u0", base=10, pending=1500, unread=2100, known=2600),
        "u1": large_state("u1", base=0, pending=1001, unread=1001, known=1001),
        "u2": large_state("u2", base=5000, pending=20, unread=3, known=4),
        "carol": EMPTY,  # forgets carol's queue
        "dave": UserState(3, 1, (Entry(3, message(30, "dave", ts=ts)),), (),
                          (("alice", "m30", ts),)),
    }
    async with running_store(dirs) as store:
        # What the replace sets anew: earlier queues of u0, carol and dave.
        await store.put("u0", [Entry(n, message(100 + n, "u0")) for n in range(1, 30)])
        await store.put("carol", [Entry(1, message(200, "carol"))])
        await store.put("dave", [Entry(1, message(300, "dave")), Entry(2, receipt(3))])
        await store.acknowledge_only("dave", "delivered", 1, None)
        old_ids = set(store.index.ids)

        await store.replace(states)
        before = exported(store, users)
        for user in ("u0", "u1", "u2", "dave"):
            state = before[user]
            assert state.entries == states[user].entries, f"{user}'s queue is not the state's"
            assert (state.last_seq, state.acked, state.unread) == (
                states[user].last_seq, states[user].acked, states[user].unread)
            # the ids given, and the ids remembered before (a merge keeps them)
            given = {(s, i) for s, i, _ in states[user].known}
            assert given <= {(s, i) for s, i, _ in state.known}
            assert {(s, i) for s, i, _ in state.known} - given <= old_ids
        assert before["carol"].entries == () and "carol" not in store.index.names()
        assert store.queued("u0") == 1500 and store.queued("dave") == 1

    for directory in dirs:  # the large states crossed the chunking of UNREAD and KNOWN
        written = [(t, fields[1]) for t, fields, *_ in records(directory)]
        for user in ("u0", "u1"):
            assert len(states[user].unread) > CHUNK and len(states[user].known) > CHUNK
            assert written.count((UNREAD, user)) == -(-len(states[user].unread) // CHUNK)
            assert written.count((KNOWN, user)) == -(-len(states[user].known) // CHUNK)
        assert written.count((REPLACE, "carol")) == 1

    async with running_store(dirs) as store:  # replayed from the log
        assert exported(store, users) == before
        assert store.index.pending_total == sum(len(s.entries) for s in before.values())
        await store.checkpoint()
    async with running_store(dirs) as store:  # restored from the checkpoint
        assert exported(store, users) == before
        # and the queues still work: u1 acknowledges its first 1000 pending entries
        first = before["u1"].entries[999].seq
        receipts = await store.acknowledge_only("u1", "delivered", first, None)
        assert sum(len(item.ids) for _, item in receipts
                   if item.status == "delivered") == sum(
            1 for e in before["u1"].entries[:1000] if isinstance(e.item, Message))
        after = exported(store, users)
    async with running_store(dirs) as store:
        assert exported(store, users) == after


@pytest.mark.parametrize("case", ["entry-id-not-known", "expired-known-id"])
async def test_replace_recovers_the_remembered_ids_it_set(dirs: list[Path], case: str
                                                          ) -> None:
    # A merged state lists the ids each replica remembered. An entry whose id a replica had
    # already forgotten (dedup window or limit) is in no list; an id remembered near the
    # end of its window may be past it by the time the state is set.
    if case == "entry-id-not-known":
        state = UserState(4, 1, (Entry(2, message(2, "bob")), Entry(4, message(4, "bob"))),
                          (), (("alice", "m2", now_ms()),))
    else:
        old = now_ms() - 2 * 86_400_000
        state = UserState(4, 1, (Entry(4, message(4, "bob")),), (),
                          (("alice", "m4", now_ms()), ("alice", "m1", old)))
    async with running_store(dirs) as store:
        await store.replace({"bob": state})
        before = exported(store, ["bob"])["bob"]
    async with running_store(dirs) as store:
        after = exported(store, ["bob"])["bob"]
    assert after == before, f"remembered ids {before.known} became {after.known}"


# -- a torn final batch ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize("torn", [[0, 1], [0]], ids=["both-replicas", "one-replica"])
async def test_torn_put_batch_recovers_a_prefix_of_its_entries(
        dirs: list[Path], keep: int, torn: list[int]) -> None:
    batch = [Entry(10 + n, message(10 + n, "bob")) for n in range(5)]
    async with running_store(dirs) as store:
        await store.put("bob", [Entry(n, message(n, "bob")) for n in range(1, 4)])
        await store.acknowledge_only("bob", "read", 1, None)
        earlier = exported(store, ["bob"])["bob"]
        await store.put("bob", batch)
        complete = exported(store, ["bob"])["bob"]
    for replica in torn:
        tear(dirs[replica], len(batch), keep)

    async with running_store(dirs) as store:
        recovered = exported(store, ["bob"])["bob"]
        if len(torn) == 1:
            assert recovered == complete, "the intact replica's copy of the batch was lost"
        else:  # the crash cut the write: the entries before the cut, nothing else lost
            assert recovered.entries == earlier.entries + tuple(batch[:keep])
            assert recovered.acked == earlier.acked and recovered.unread == earlier.unread
            assert recovered.last_seq == (batch[keep - 1].seq if keep else earlier.last_seq)
        # The leader writes the batch again: the repeats are skipped, the rest queued.
        await store.put("bob", batch)
        assert exported(store, ["bob"])["bob"] == complete
    async with running_store(dirs) as store:
        assert exported(store, ["bob"])["bob"] == complete
    for directory in dirs:  # repaired: both replicas clean
        records(directory)


@pytest.mark.parametrize(("torn", "keep"), [
    pytest.param([0, 1], 1, id="both-replicas-after-replace"),
    pytest.param([0, 1], 4, id="both-replicas-in-puts"),
    pytest.param([1], 1, id="one-replica-after-replace"),
    pytest.param([0], 4, id="one-replica-in-puts"),
])
async def test_torn_replace_batch_recovers_all_or_nothing(
        dirs: list[Path], torn: list[int], keep: int) -> None:
    held = [Entry(n, message(n, "bob")) for n in range(1, 6)]
    entries = (*held, Entry(6, message(6, "bob", "carol")), Entry(7, message(7, "bob", "carol")))
    known = tuple((e.item.sender, e.item.id, e.item.ts) for e in entries
                  if isinstance(e.item, Message))
    merged = UserState(8, 0, entries, (), known)
    async with running_store(dirs) as store:
        await store.put("bob", held)
        old = exported(store, ["bob"])["bob"]
        await store.replace({"bob": merged})
        new = exported(store, ["bob"])["bob"]
    # REPLACE, KNOWN, then one PUT per entry: cut the first or a middle PUT.
    for replica in torn:
        tear(dirs[replica], 2 + len(merged.entries), keep + 1)

    async with running_store(dirs) as store:
        recovered = exported(store, ["bob"])["bob"]
    if len(torn) == 1:
        assert recovered == new, "the intact replica's copy of the replace was lost"
    assert recovered in (old, new), (
        f"a torn replace left bob's queue at {seqs(recovered)}: neither the queue before "
        f"it, {seqs(old)}, nor the one it set, {seqs(new)}")
