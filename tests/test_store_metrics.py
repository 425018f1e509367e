"""The embedded engine's store metrics and alarm, read as a scrape reads them.

The queue backlog (``chatd_queue_backlog_items``, ``chatd_queue_backlog_bytes``) on both
stores, across restarts, and the durable store's ``replica_unreadable`` alarm
(``chatd_replica_unreadable`` and its events): raised at recovery when a replica cannot give
queued items on its own and cleared once the repair is written, raised for good when a
replica fails at run time. Every test runs an :class:`EmbeddedBackend` on real replica
directories under ``tmp_path``, exported into a :class:`Metrics` whose text exposition is
parsed back; damage is made by editing the segment files while the store is stopped, and a
failing disk by making ``fsync`` fail on one replica's files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from records import read_records

from chatd.actors import ActorTable
from chatd.backends import Message, ReceiptItem, StoreUnavailable
from chatd.backends.embedded import DurableStore, EmbeddedBackend, RecordType
from chatd.backends.embedded._segments import HEADER_BYTES, SegmentLog
from chatd.clock import now_ms
from chatd.config import Config
from chatd.metrics import Metrics

DEADLINE = 10.0  # seconds any single wait in these tests may take
ITEMS, BYTES = "chatd_queue_backlog_items", "chatd_queue_backlog_bytes"
UNREADABLE = "chatd_replica_unreadable"
STORE_LOGGER = "chatd.backends.embedded._durable"


@pytest.fixture(autouse=True)
def _store_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    """Let ``chatd`` records, info ones included, reach caplog even if a test configured
    JSON logging."""
    monkeypatch.setattr(logging.getLogger("chatd"), "propagate", True)
    caplog.set_level(logging.INFO, logger="chatd")


# -- helpers -------------------------------------------------------------------------------


def config(tmp_path: Path, store: str = "durable") -> Config:
    """A configuration whose replicas are ``tmp_path/data/store/0`` and ``.../1``."""
    return Config(data_dir=tmp_path / "data", store=store)


@asynccontextmanager
async def serving(backend: EmbeddedBackend) -> AsyncIterator[EmbeddedBackend]:
    """``backend`` running (recovered, for the durable store); stopped cleanly on exit."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(backend.run)
        yield backend
        nursery.cancel_scope.cancel()


def exported(cfg: Config, metrics: Metrics) -> EmbeddedBackend:
    """A new backend (a new process, as far as the store knows) exporting into ``metrics``."""
    backend = EmbeddedBackend(cfg, ActorTable("n1"))
    backend.export(metrics)
    return backend


def durable(backend: EmbeddedBackend) -> DurableStore:
    """The backend's store, which must be the durable one."""
    assert isinstance(backend.store, DurableStore)
    return backend.store


def gauges(metrics: Metrics) -> dict[str, float]:
    """The samples of every gauge in ``metrics``' exposition, by name (none has labels)."""
    text = metrics.exposition().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            if family.type == "gauge" and family.name.startswith("chatd_")
            for sample in family.samples}


def backlog(metrics: Metrics) -> tuple[int, int]:
    """The backlog gauges: (items, bytes)."""
    values = gauges(metrics)
    return int(values[ITEMS]), int(values[BYTES])


def msg(msg_id: str, to: str, body: str = "hello", sender: str = "alice") -> Message:
    """Message ``msg_id`` from ``sender`` to ``to``, now."""
    return Message(msg_id, sender, to, body, now_ms())


def counted(backend: EmbeddedBackend) -> tuple[int, int]:
    """Items and bytes of the backlog, counted again from every queue, by the documented
    definition: a message's body in UTF-8, a receipt's message ids."""
    items = size = 0
    for _, _, entries, _, _ in backend.store.index.users():
        for entry in entries:
            items += 1
            item = entry.item
            size += (len(item.body.encode()) if isinstance(item, Message)
                     else sum(len(msg_id.encode()) for msg_id in item.ids))
    return items, size


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The structured fields, and level, of every captured record of event ``name``."""
    return [{**getattr(r, "chatd_fields", {}), "level": r.levelname.lower()}
            for r in caplog.records if r.msg == name]


class GaugeAtEvents(logging.Handler):
    """Reads the ``chatd_replica_unreadable`` gauge each time the store logs an event, in
    the task or thread that logs it: what a scrape would have read at that moment."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics
        self.seen: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((str(record.msg), gauges(self.metrics)[UNREADABLE]))


@asynccontextmanager
async def watching(metrics: Metrics) -> AsyncIterator[GaugeAtEvents]:
    handler = GaugeAtEvents(metrics)
    logger = logging.getLogger(STORE_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def records_of(directory: Path) -> list[tuple[Path, int, int, int, list[Any]]]:
    """(file, offset, size, type, fields) of every record of a cleanly stopped replica."""
    log = SegmentLog(directory)
    try:
        out = [(directory / f"{r.position.segment:020d}.seg", r.position.offset,
                HEADER_BYTES + len(r.payload), r.type, cbor2.loads(r.payload))
               for r in read_records(log)]
        assert log.damage == [] and log.truncated == 0
    finally:
        log.close()
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(directory: Path, pick: Callable[[int, list[Any]], bool]) -> int:
    """Flip a byte in the middle of every record of a stopped replica that ``pick``
    (type, fields) chooses; how many."""
    chosen = [(path, offset + size // 2) for path, offset, size, record_type, fields
              in records_of(directory) if pick(record_type, fields)]
    for path, offset in chosen:
        flip_byte(path, offset)
    return len(chosen)


def failing_fsync(directory: Path) -> Callable[[int], None]:
    """``os.fsync`` that fails with EIO on every file of ``directory``."""
    real_fsync, failing = os.fsync, directory.resolve()

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(failing):
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)

    return fsync


# -- the queue backlog ---------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "durable"])
async def test_backlog_counts_the_items_waiting_and_their_content(
        tmp_path: Path, store: str) -> None:
    metrics = Metrics("n1")
    async with serving(exported(config(tmp_path, store), metrics)) as backend:
        queues = backend.store
        assert backlog(metrics) == (0, 0)
        # Bodies count in UTF-8: "héllo ☃" is 7 characters and 10 bytes.
        for message in (msg("m1", "bob", "hello"), msg("m2", "bob", "héllo ☃"),
                        msg("m3", "carol", ""), msg("m4", "carol", "x" * 1000)):
            await queues.submit(message)
        assert backlog(metrics) == (4, 5 + 10 + 0 + 1000)
        await queues.submit(msg("m1", "bob", "hello"))  # a duplicate queues nothing
        assert backlog(metrics) == (4, 1015)

        # bob's two messages leave; alice gets a receipt whose content is their ids.
        receipts = await queues.acknowledge("bob", "delivered", 2)
        assert [(sender, entry.item) for sender, entry in receipts] == [
            ("alice", ReceiptItem("delivered", "bob", ("m1", "m2"), receipts[0][1].item.ts))]
        assert backlog(metrics) == (2 + 1, 1000 + len("m1") + len("m2"))

        await queues.acknowledge("carol", "read", 2)
        await queues.acknowledge("bob", "read", 2)  # delivered, now read: a receipt
        assert backlog(metrics) == counted(backend)
        assert backlog(metrics)[0] == queues.queued("alice") > 1
        await queues.acknowledge("alice", "delivered", backend.store.index.last_seq("alice"))
        assert backlog(metrics) == (0, 0)
        if store == "memory":
            assert UNREADABLE not in gauges(metrics)  # no replicas: no alarm to raise
        else:
            assert gauges(metrics)[UNREADABLE] == 0


async def test_backlog_is_restored_from_the_log_and_from_checkpoints(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    metrics = Metrics("n1")
    backend = exported(cfg, metrics)
    async with serving(backend):
        for n in range(6):
            await backend.store.submit(msg(f"m{n}", "bob" if n % 2 else "carol", f"é{n}" * n))
        await backend.store.acknowledge("bob", "delivered", 2)  # a receipt for alice
        before = backlog(metrics)
        assert before == counted(backend) and before[0] == 5

    # A new process: everything is replayed from the log.
    metrics = Metrics("n1")
    backend = exported(cfg, metrics)
    async with serving(backend):
        assert backlog(metrics) == before
        await durable(backend).checkpoint()
        await backend.store.submit(msg("late", "dave", "after the checkpoint"))
        await backend.store.acknowledge("carol", "delivered", 1)
        before = backlog(metrics)
        assert before == counted(backend)

    # A new process: the checkpoint, then the changes after it.
    metrics = Metrics("n1")
    backend = exported(cfg, metrics)
    async with serving(backend):
        assert backlog(metrics) == before

    # The supervisor restarting the backend: the same object and metrics, a new index.
    async with serving(backend):
        assert backlog(metrics) == before == counted(backend)


# -- replica_unreadable at recovery ----------------------------------------------------------


async def _queue_for_several_users(backend: EmbeddedBackend, *, checkpoint: bool) -> None:
    """bob 3 messages, carol 2, dave 2 that he acknowledges (alice gets a receipt), then
    erin 1 (after a checkpoint when ``checkpoint``)."""
    store = durable(backend)
    for msg_id, to in (("b1", "bob"), ("b2", "bob"), ("b3", "bob"), ("c1", "carol"),
                       ("c2", "carol"), ("d1", "dave"), ("d2", "dave")):
        await store.submit(msg(msg_id, to))
    await store.acknowledge("dave", "delivered", 2)
    if checkpoint:
        await store.checkpoint()
    await store.submit(msg("e1", "erin"))


def _damage_records(replicas: list[Path]) -> tuple[int, list[str], int]:
    # The first message of bob, carol and dave, and dave's acknowledgement (it queued
    # alice's receipt). dave's messages were acknowledged: not waiting, not counted.
    picked = damage(replicas[0], lambda t, f: (
        (t == RecordType.MSG and f[3] in ("b1", "c1", "d1")) or t == RecordType.ACK))
    assert picked == 4
    return 0, ["alice", "bob", "carol"], 3


def _torn_tail(replicas: list[Path]) -> tuple[int, list[str], int]:
    path, offset, size, record_type, fields = records_of(replicas[0])[-1]
    assert (record_type, fields[3]) == (RecordType.MSG, "e1")
    os.truncate(path, offset + size // 2)
    return 0, ["erin"], 1


def _lost_replica(replicas: list[Path]) -> tuple[int, list[str], int]:
    shutil.rmtree(replicas[1])
    return 1, ["alice", "bob", "carol", "erin"], 3 + 2 + 1 + 1


def _damaged_checkpoint(replicas: list[Path]) -> tuple[int, list[str], int]:
    # The checkpoint deleted the older segments: without it, replica 0 has nothing of what
    # was queued before it; erin's message came after it, on both.
    picked = damage(replicas[0], lambda t, f: t == RecordType.CK_ENTRY and f[1] == "bob")
    assert picked == 3
    return 0, ["alice", "bob", "carol"], 1 + 3 + 2


#: How a stopped store's replicas are harmed: (checkpoint before erin's message, the harm).
#: The harm returns the replica that then lacks queued items, the users whose items those
#: are, and how many items.
CASES = {
    "damaged-records": (False, _damage_records),
    "torn-tail": (False, _torn_tail),
    "lost-replica": (False, _lost_replica),
    "damaged-checkpoint": (True, _damaged_checkpoint),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_replica_unreadable_is_raised_at_recovery_and_cleared_by_the_repair(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    checkpoint, harm = CASES[case]
    cfg = config(tmp_path)
    replicas = list(cfg.replica_paths)
    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)) as backend:
        await _queue_for_several_users(backend, checkpoint=checkpoint)
        before = backlog(metrics)
    lacking, users, items = harm(replicas)

    metrics = Metrics("n1")
    async with watching(metrics) as gauge, serving(exported(cfg, metrics)) as backend:
        (raised,) = events(caplog, "replica_unreadable")
        assert raised == {"level": "warning", "node": "n1", "component": "store",
                          "replica": str(replicas[lacking]), "queues": len(users),
                          "items": items, "user_ids": users}
        (cleared,) = events(caplog, "replica_unreadable_cleared")
        assert cleared["queues"] == len(users)
        # Raised as recovery reported it, still raised when the repair began, 0 once the
        # repair was on both replicas.
        assert [(event, value) for event, value in gauge.seen if event in (
            "replica_unreadable", "replicas_repaired", "replica_unreadable_cleared")] == [
            ("replica_unreadable", len(users)), ("replicas_repaired", len(users)),
            ("replica_unreadable_cleared", 0)]
        assert gauges(metrics)[UNREADABLE] == 0
        assert backlog(metrics) == before

    # Both replicas were rewritten: the next start finds each able to give everything.
    caplog.clear()
    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)):
        assert not events(caplog, "replica_unreadable")
        assert not events(caplog, "replicas_repaired")
        assert gauges(metrics)[UNREADABLE] == 0
    shutil.rmtree(replicas[1 - lacking])  # the repaired replica alone holds everything
    async with serving(exported(cfg, Metrics("n1"))) as backend:
        assert counted(backend) == before


async def test_a_replica_whose_older_records_hold_the_queues_raises_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Replica 1 stopped just before a checkpoint (a crash part-way through one): it lacks
    the checkpoint, but its own records add every item still queued."""
    cfg = config(tmp_path)
    replicas = list(cfg.replica_paths)
    async with serving(exported(cfg, Metrics("n1"))) as backend:
        await _queue_for_several_users(backend, checkpoint=False)
    shutil.copytree(replicas[1], tmp_path / "before-checkpoint")
    async with serving(exported(cfg, Metrics("n1"))) as backend:
        await durable(backend).checkpoint()
    shutil.rmtree(replicas[1])
    shutil.copytree(tmp_path / "before-checkpoint", replicas[1])

    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)):
        assert events(caplog, "replicas_repaired")  # replica 1 differs: it is rewritten
        assert not events(caplog, "replica_unreadable")
        assert gauges(metrics)[UNREADABLE] == 0


async def test_a_failed_repair_leaves_replica_unreadable_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    replicas = list(cfg.replica_paths)
    async with serving(exported(cfg, Metrics("n1"))) as backend:
        await _queue_for_several_users(backend, checkpoint=False)
    _damage_records(replicas)  # replica 0 lacks items of alice, bob and carol
    monkeypatch.setattr("chatd.backends.embedded._segments.os.fsync",
                        failing_fsync(replicas[1]))  # and replica 1 fails the repair

    metrics = Metrics("n1")
    backend = exported(cfg, metrics)
    with pytest.raises(BaseExceptionGroup) as failure:
        async with serving(backend):
            pytest.fail("the store served although its repair failed")
    assert failure.value.subgroup(StoreUnavailable) is not None
    assert events(caplog, "replica_unreadable")[0]["queues"] == 3
    assert events(caplog, "replica_failed")
    # Every user with queued items now rests on replica 0 alone, where three of them lack
    # items: the alarm stays raised.
    (failed,) = [e for e in events(caplog, "replica_unreadable") if e["level"] == "error"]
    assert (failed["replica"], failed["queues"], failed["user_ids"]) == (
        str(replicas[1]), 4, ["alice", "bob", "carol", "erin"])
    assert not events(caplog, "replica_unreadable_cleared")
    assert gauges(metrics)[UNREADABLE] == 4


# -- replica_unreadable at run time --------------------------------------------------------


async def test_a_replica_failing_at_run_time_raises_replica_unreadable_until_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    replicas = list(cfg.replica_paths)
    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)) as backend:
        store = durable(backend)
        await _queue_for_several_users(backend, checkpoint=False)
        await store.acknowledge("alice", "delivered", 1)  # alice: nothing waits
        assert not events(caplog, "replica_unreadable")
        assert gauges(metrics)[UNREADABLE] == 0

        with monkeypatch.context() as patch:
            patch.setattr("chatd.backends.embedded._segments.os.fsync",
                          failing_fsync(replicas[1]))
            with pytest.raises(StoreUnavailable):
                await store.submit(msg("f1", "frank"))
        (failed,) = events(caplog, "replica_unreadable")
        assert failed == {"level": "error", "error": "replica_unreadable", "node": "n1",
                          "component": "store", "replica": str(replicas[1]), "queues": 3,
                          "items": 3 + 2 + 1, "user_ids": ["bob", "carol", "erin"]}
        assert gauges(metrics)[UNREADABLE] == 3
        # The disk works again, but the replica stays failed, and so does the alarm.
        with pytest.raises(StoreUnavailable):
            await store.acknowledge("bob", "delivered", 3)
        assert gauges(metrics)[UNREADABLE] == 3
        assert len(events(caplog, "replica_unreadable")) == 1

    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)):
        assert gauges(metrics)[UNREADABLE] == 0


async def test_a_replica_failing_with_every_queue_empty_raises_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    metrics = Metrics("n1")
    async with serving(exported(cfg, metrics)) as backend:
        monkeypatch.setattr("chatd.backends.embedded._segments.os.fsync",
                            failing_fsync(cfg.replica_paths[0]))
        with pytest.raises(StoreUnavailable):
            await backend.store.submit(msg("m1", "bob"))
        assert events(caplog, "replica_failed")
        assert not events(caplog, "replica_unreadable")
        assert gauges(metrics)[UNREADABLE] == 0
