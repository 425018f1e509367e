"""The embedded engine's store metrics, read as a scrape reads them.

The queue backlog (``chatd_queue_backlog_items``, ``chatd_queue_backlog_bytes``) on both
stores, across restarts. Every test runs an :class:`EmbeddedBackend` on real replica
directories under ``tmp_path``, exported into a :class:`Metrics` whose text exposition is
parsed back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from chatd.actors import ActorTable
from chatd.backends import Message, ReceiptItem
from chatd.backends.embedded import DurableStore, EmbeddedBackend
from chatd.clock import now_ms
from chatd.config import Config
from chatd.metrics import Metrics

DEADLINE = 10.0  # seconds any single wait in these tests may take
ITEMS, BYTES = "chatd_queue_backlog_items", "chatd_queue_backlog_bytes"


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
