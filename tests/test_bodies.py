"""Queued items on disk: the durable store's index holds where they are, and reads them back.

Every test runs real stores on real replica directories under ``tmp_path``. Damage a
running store meets is made by editing (or removing) a segment file under it, after
recovery; damage recovery meets, by editing the files while the store is stopped.
"""

from __future__ import annotations

import gc
import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from records import read_records
from test_durable import running_store

from chatd.backends import Entry, Message, ReceiptItem, StoreUnavailable
from chatd.backends.embedded import DurableStore
from chatd.backends.embedded._bodies import Bodies, BodyCache
from chatd.backends.embedded._segments import HEADER_BYTES, SegmentLog
from chatd.clock import now_ms

ALL = 1_000_000
MSG = 1


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    """The two replica directories of the store under test."""
    return [tmp_path / "r0", tmp_path / "r1"]


@pytest.fixture(autouse=True)
def _store_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    """Let ``chatd`` records propagate to caplog even if a test configured JSON logging."""
    monkeypatch.setattr(logging.getLogger("chatd"), "propagate", True)
    caplog.set_level(logging.INFO, logger="chatd")


def msg(n: int, to: str, body: str | None = None, sender: str = "alice") -> Message:
    """Message ``m<n>`` from ``sender`` to ``to``."""
    return Message(f"m{n}", sender, to, body if body is not None else f"body {n} for {to}",
                   now_ms())


async def submit(store: DurableStore, messages: Sequence[Message]) -> None:
    for result in await store.submit_many(messages):
        assert not isinstance(result, Exception), result


async def drain(store: DurableStore, user: str, batch: int = 7) -> list[Entry]:
    """Every queued entry of ``user``, read ``batch`` at a time as a session would."""
    got: list[Entry] = []
    while True:
        entries = await store.pending(user, got[-1].seq if got else 0, batch)
        if not entries:
            return got
        got.extend(entries)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The structured fields, and level, of every captured record of event ``name``."""
    return [{**getattr(r, "chatd_fields", {}), "level": r.levelname.lower()}
            for r in caplog.records if r.msg == name]


def segment(directory: Path, serial: int) -> Path:
    return directory / f"{serial:020d}.seg"


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def damage_item(store: DurableStore, directory: Path, user: str, seq: int) -> None:
    """Flip a byte in the payload of the record that holds item ``seq`` of ``user``."""
    ref = store.index.ref(user, seq)
    assert ref is not None
    _, serial, offset = ref
    flip_byte(segment(directory, serial), offset + HEADER_BYTES + 3)


def records_of(directory: Path) -> list[tuple[Path, int, int, int, list[Any]]]:
    """(file, offset, size, type, fields) of every record of a stopped replica."""
    log = SegmentLog(directory)
    try:
        return [(segment(directory, r.position.segment), r.position.offset,
                 HEADER_BYTES + len(r.payload), r.type, cbor2.loads(r.payload))
                for r in read_records(log)]
    finally:
        log.close()


def reachable_strings(roots: Sequence[object]) -> set[str]:
    """Every string reachable from ``roots`` through containers and objects."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            found.add(obj)
        elif not isinstance(obj, type | int | bytes | array):
            stack.extend(gc.get_referents(obj))
    return found


# -- the index holds references ------------------------------------------------------------


async def test_the_index_holds_where_items_are_and_no_body(dirs: list[Path]) -> None:
    bodies = [f"body number {n} " + "z" * (n % 50) for n in range(300)]
    async with running_store(dirs) as store:
        await submit(store, [msg(n, f"u{n % 10}", body) for n, body in enumerate(bodies)])
        await store.acknowledge("u0", "delivered", 5)  # receipts for alice
        index = store.index
        queue = index._queues["u1"]
        # Four packed arrays per user: 24 bytes per queued item, no object per item.
        assert [values.itemsize for values in (queue.seqs, queue.serials, queue.offsets,
                                               queue.sizes)] == [8, 4, 8, 4]
        assert len(queue.seqs) == 30
        strings = reachable_strings([index._queues, index.ids, index.usage])
        assert not strings & set(bodies)
        assert "u1" in strings and "alice" in strings  # the walk does reach what is there
        # Read back, they are the bodies submitted (the cache emptied first).
        store.bodies.cache.clear()
        got = {entry.item.body for user in (f"u{n}" for n in range(10))
               for entry in await drain(store, user) if isinstance(entry.item, Message)}
        assert got == set(bodies) - {bodies[n] for n in range(0, 50, 10)}


# -- backlogs read back from disk ----------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [None, "index", "rewrite"])
async def test_a_backlog_on_disk_streams_in_order_after_restart(
        dirs: list[Path], checkpoint: str | None) -> None:
    users = [f"u{n}" for n in range(5)]
    bodies = {n: f"{n}: " + ("héllo ☃ " if n % 7 == 0 else "hello ") * (n % 30)
              for n in range(600)}
    bodies[17] = "x" * 20_000  # larger than a first read of 4096 bytes
    async with running_store(dirs, segment_bytes=64 * 1024) as store:
        for start in range(0, 600, 50):
            await submit(store, [msg(n, users[n % 5], bodies[n])
                                 for n in range(start, start + 50)])
        await store.acknowledge("u0", "read", 30)
        before = {user: await drain(store, user) for user in [*users, "alice"]}
        if checkpoint is not None:
            await store.checkpoint(rewrite=checkpoint == "rewrite")
    assert len(before["u1"]) == 120 and len(before["u0"]) == 120 - 30
    assert before["alice"] and all(isinstance(e.item, ReceiptItem) for e in before["alice"])

    async with running_store(dirs, segment_bytes=64 * 1024, cache_items=8,
                             cache_bytes=4096) as store:
        for user, entries in before.items():
            assert await drain(store, user) == entries
        assert await store.pending("u2", before["u2"][10].seq, 3) == before["u2"][11:14]
        cache = store.bodies.cache
        assert len(cache) <= 8 and cache.bytes <= 4096
        # The senders and ids of the messages an acknowledgement removes are read back too.
        receipts = await store.acknowledge("u1", "delivered", before["u1"][49].seq)
        assert [(sender, entry.item.ids) for sender, entry in receipts] == [
            ("alice", tuple(e.item.id for e in before["u1"][:50]  # type: ignore[union-attr]
                            ))]


async def test_the_cache_stays_within_its_bounds(dirs: list[Path]) -> None:
    async with running_store(dirs, cache_items=16, cache_bytes=10_000) as store:
        cache = store.bodies.cache
        await submit(store, [msg(n, "bob", f"{n:04d}" * 250) for n in range(100)])
        await submit(store, [msg(100, "bob", "y" * 20_000)])  # too large to be cached
        assert len(cache) <= 16 and cache.bytes <= 10_000
        assert cache.get("bob", 101) is None
        cache.clear()
        after = 0
        while entries := await store.pending("bob", after, 5):
            after = entries[-1].seq
            assert len(cache) <= 16 and cache.bytes <= 10_000
        assert after == 101
        assert cache.get("bob", 100) is not None and cache.get("bob", 90) is None


def test_the_cache_drops_the_least_recently_used_first() -> None:
    cache = BodyCache(items=3, size=100)
    entries = [Entry(seq, Message(f"m{seq}", "alice", "bob", "x" * 10, 0))
               for seq in range(1, 6)]
    for entry in entries[:3]:
        cache.put("bob", entry)
    assert cache.get("bob", 1) == entries[0]  # now the most recently used
    cache.put("bob", entries[3])
    assert cache.get("bob", 2) is None and cache.get("bob", 1) == entries[0]
    assert (len(cache), cache.bytes) == (3, 30)
    cache.put("bob", Entry(6, Message("m6", "alice", "bob", "y" * 95, 0)))
    assert (len(cache), cache.bytes) == (1, 95)  # the bytes bound dropped the rest
    cache.forget("bob", [6])
    assert (len(cache), cache.bytes) == (0, 0)


def test_a_read_checks_it_is_the_item_asked_for(dirs: list[Path]) -> None:
    log = SegmentLog(dirs[0])
    assert list(log.recover()) == []
    payload = cbor2.dumps([1, "bob", 7, "m1", "alice", "hello", 5])
    (position,) = log.append([(MSG, payload)])
    log.sync()
    log.close()
    bodies = Bodies(dirs, BodyCache())
    ((entry, failed),) = bodies.read_now("bob", [(7, position.segment, position.offset)])
    assert entry == Entry(7, Message("m1", "alice", "bob", "hello", 5)) and failed == 0
    # Another item, another user, an offset where no record starts: none is that item;
    # replica 1 has no files at all.
    for user, ref in (("bob", (8, position.segment, position.offset)),
                      ("carol", (7, position.segment, position.offset)),
                      ("bob", (7, position.segment, position.offset + 1)),
                      ("bob", (7, position.segment + 1, position.offset))):
        assert bodies.read_now(user, [ref]) == [(None, 0b11)]


# -- a damaged replica at run time ---------------------------------------------------------


@pytest.mark.parametrize("harm", ["damaged", "missing"])
async def test_an_item_unreadable_on_the_first_replica_is_read_from_the_second(
        dirs: list[Path], caplog: pytest.LogCaptureFixture, harm: str) -> None:
    async with running_store(dirs) as store:
        await submit(store, [msg(n, "bob" if n % 2 else "carol") for n in range(20)])
        before = {user: await drain(store, user) for user in ("bob", "carol")}
        store.bodies.cache.clear()
        if harm == "damaged":
            damage_item(store, dirs[0], "bob", 3)
        else:
            os.unlink(segment(dirs[0], 1))  # every item of both users
        assert await drain(store, "bob") == before["bob"]
        (raised,) = events(caplog, "replica_unreadable")
        assert raised == {"level": "error", "error": "replica_unreadable", "node": "n1",
                          "component": "store", "replica": str(dirs[0]), "queues": 1,
                          "items": 1 if harm == "damaged" else 7, "user_ids": ["bob"]}
        assert store.unreadable == 1
        assert await drain(store, "bob") == before["bob"]  # raised once for the user
        assert len(events(caplog, "replica_unreadable")) == 1
        assert await drain(store, "carol") == before["carol"]
        assert store.unreadable == (1 if harm == "damaged" else 2)
        # The acknowledgement reads the messages' senders and ids from replica 1 too.
        receipts = await store.acknowledge("bob", "delivered", 10)
        assert [entry.item.ids for _, entry in receipts] == [  # type: ignore[union-attr]
            tuple(f"m{n}" for n in range(1, 20, 2))]


async def test_damage_on_the_second_replica_is_not_read_at_run_time(
        dirs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    async with running_store(dirs) as store:
        await submit(store, [msg(n, "bob") for n in range(5)])
        before = await drain(store, "bob")
        store.bodies.cache.clear()
        damage_item(store, dirs[1], "bob", 2)
        assert await drain(store, "bob") == before
        assert not events(caplog, "replica_unreadable") and store.unreadable == 0
    # Recovery reads both replicas: it finds the damage and repairs it.
    async with running_store(dirs) as store:
        assert events(caplog, "replica_damaged") and events(caplog, "replicas_repaired")
        assert await drain(store, "bob") == before


async def test_an_item_readable_from_neither_replica_refuses_the_read(
        dirs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    async with running_store(dirs) as store:
        await submit(store, [msg(n, "bob" if n % 2 else "carol") for n in range(10)])
        carol = await drain(store, "carol")
        store.bodies.cache.clear()
        for directory in dirs:
            damage_item(store, directory, "bob", 2)
        with pytest.raises(StoreUnavailable):
            await store.pending("bob", 0, ALL)
        with pytest.raises(StoreUnavailable):
            await store.acknowledge("bob", "delivered", 5)
        assert store.queued("bob") == 5  # the acknowledgement changed nothing
        assert {e["replica"] for e in events(caplog, "replica_unreadable")} == {
            str(d) for d in dirs}
        assert await drain(store, "carol") == carol
        assert await store.pending("bob", 2, ALL)  # the items after it still stream
    # At the next start, its record is lost on both replicas: reported, not queued.
    caplog.clear()
    async with running_store(dirs) as store:
        assert [e["count"] for e in events(caplog, "records_lost")] == [1]
        assert [e.seq for e in await drain(store, "bob")] == [1, 3, 4, 5]
        assert await drain(store, "carol") == carol


async def test_a_read_that_races_a_compaction_raises_nothing(
        dirs: list[Path], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_store(dirs, segment_bytes=4096, checkpoint_interval=3600.0) as store:
        await submit(store, [msg(n, "bob" if n % 4 == 0 else "carol", "y" * 300)
                             for n in range(80)])
        await store.acknowledge("carol", "delivered", store.index.last_seq("carol"))
        before = await drain(store, "bob", ALL)
        store.bodies.cache.clear()
        read = store.bodies.read

        async def read_after_compaction(user: str, refs: Any) -> Any:
            # The references were taken; before they are read, compaction moves the items
            # and deletes the segments they were in.
            monkeypatch.setattr(store.bodies, "read", read)
            await store.checkpoint(rewrite=False)
            await store.compact()
            assert store.maintenance.deleted
            return await read(user, refs)

        monkeypatch.setattr(store.bodies, "read", read_after_compaction)
        assert await store.pending("bob", 0, ALL) == before
        assert not events(caplog, "replica_unreadable") and store.unreadable == 0


# -- recovery with references --------------------------------------------------------------


async def test_a_damaged_record_a_checkpoint_refers_to_is_repaired(
        dirs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    async with running_store(dirs) as store:
        await submit(store, [msg(n, "bob" if n % 2 else "carol") for n in range(10)])
        await store.checkpoint(rewrite=False)
        await submit(store, [msg(10, "erin")])
        before = {user: await drain(store, user) for user in ("bob", "carol", "erin")}
    # bob's second message: its MSG record, before the checkpoint that refers to it.
    (picked,) = [(path, offset, size) for path, offset, size, record_type, fields
                 in records_of(dirs[0]) if record_type == MSG and fields[3] == "m3"]
    flip_byte(picked[0], picked[1] + picked[2] // 2)

    async with running_store(dirs) as store:
        (damaged,) = events(caplog, "replica_damaged")
        assert damaged["replica"] == str(dirs[0])
        (raised,) = events(caplog, "replica_unreadable")
        assert (raised["level"], raised["replica"], raised["queues"], raised["items"],
                raised["user_ids"]) == ("warning", str(dirs[0]), 1, 1, ["bob"])
        assert events(caplog, "replicas_repaired")
        assert events(caplog, "replica_unreadable_cleared") and store.unreadable == 0
        assert not events(caplog, "records_lost")
        assert {user: await drain(store, user) for user in before} == before
    os.rename(dirs[1], dirs[1].with_name("gone"))  # the repaired replica 0 alone suffices
    async with running_store(dirs) as store:
        assert {user: await drain(store, user) for user in before} == before
