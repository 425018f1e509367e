"""The embedded engine: one process, its queues on its own replicated files or in memory.

With ``store = "durable"`` (the default) the queues and the durable state buckets live in
the :class:`DurableStore`, the persistence actor on two replicated append-only logs
(docs/storage.md), and blobs are files on the same two directories. With
``store = "memory"`` everything lives in process memory and is lost on stop. Buckets that
are not durable live in memory either way. The bus is the process itself
(:class:`LocalBus`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import trio
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from chatd.actors import ActorTable
from chatd.backends._interfaces import Blobs, Bucket, BucketSpec, Bus, Queues, State
from chatd.config import Config
from chatd.metrics import Metrics

from ._blobs import FileBlobs, MemoryBlobs, check_blob_name
from ._bus import LocalBus
from ._durable import DurableStore
from ._format import RecordType
from ._index import QueueIndex
from ._kv import DurableBucket, KVTable, MemoryBucket
from ._memory import MemoryStore
from ._segments import ReplicaFailed

__all__ = [
    "BLOB_META",
    "DurableStore",
    "EmbeddedBackend",
    "EmbeddedState",
    "FileBlobs",
    "LocalBus",
    "MemoryBlobs",
    "MemoryStore",
    "QueueIndex",
    "RecordType",
    "ReplicaFailed",
    "check_blob_name",
]

#: The durable bucket where :class:`FileBlobs` records each blob's size and hash.
BLOB_META = BucketSpec("blobs", durable=True, description="blob sizes and SHA-256 hashes")


class EmbeddedState:
    """Buckets in memory, or journaled by the durable store when they are durable.

    Args:
        store: The durable store, or None with the memory store (every bucket in memory).
    """

    def __init__(self, store: DurableStore | None) -> None:
        self._store = store
        self._memory = KVTable()
        self._buckets: dict[str, Bucket] = {}

    def bucket(self, spec: BucketSpec) -> Bucket:
        """The bucket ``spec`` names (see :meth:`chatd.backends.State.bucket`)."""
        bucket = self._buckets.get(spec.name)
        if bucket is None:
            if spec.durable and self._store is not None:
                bucket = DurableBucket(spec, self._store.kv, self._store.commit_kv)
            else:
                bucket = MemoryBucket(spec, self._memory)
            self._buckets[spec.name] = bucket
        return bucket


class EmbeddedBackend:
    """The embedded engine as one :class:`chatd.backends.Backend`.

    Args:
        config: Says which store (``durable`` or ``memory``), where and how big.
        actors: The node's actor table (the durable store's journal has a mailbox).
    """

    engine = "embedded"

    def __init__(self, config: Config, actors: ActorTable) -> None:
        self.store: DurableStore | MemoryStore
        blobs: Blobs
        if config.store == "memory":
            self.store = MemoryStore(dedup_window=config.dedup_window,
                                     dedup_max=config.dedup_max_ids,
                                     max_unread=config.max_unread)
            self.state: State = EmbeddedState(None)
            blobs = MemoryBlobs()
        else:
            store = self.store = DurableStore(
                actors, config.replica_paths, segment_bytes=config.segment_bytes,
                checkpoint_interval=config.checkpoint_interval,
                dedup_window=config.dedup_window, dedup_max=config.dedup_max_ids,
                max_unread=config.max_unread)
            self.state = EmbeddedState(store)
            blobs = FileBlobs(config.replica_paths, self.state.bucket(BLOB_META))
        self.queues: Queues = self.store
        self.blobs: Blobs = blobs
        self.bus: Bus = LocalBus()

    def export(self, metrics: Metrics) -> None:
        """The queues' backlog (either store); the durable store's journal (records
        appended, batches, fsyncs, and how long a batch takes to be written and fsync'd on
        both replicas) and its ``replica_unreadable`` alarm."""
        store = self.store
        # Read through the store at each scrape: a restarted durable store has a new index.
        metrics.gauge("chatd_queue_backlog_items",
                      "Items (messages and receipts) queued and not yet acknowledged, over "
                      "every user's queue.",
                      lambda: [({}, store.index.pending_total)])
        metrics.gauge("chatd_message_ids_remembered",
                      "Message ids remembered for duplicate detection (at most "
                      "dedup_max_ids).",
                      lambda: [({}, len(store.index.ids))])
        metrics.gauge("chatd_queue_backlog_bytes",
                      "UTF-8 size of those items' content: message bodies, receipts' "
                      "message ids.",
                      lambda: [({}, store.index.pending_bytes)])
        if isinstance(store, DurableStore):
            metrics.collect(functools.partial(_journal_families, store))
            # Not exported by the memory store: it has no replicas to read from.
            metrics.gauge("chatd_replica_unreadable",
                          "Users with queued items that cannot be read from both replicas "
                          "(0 once repaired; a failed replica counts every such user until "
                          "a restart).",
                          lambda: [({}, store.unreadable)])

    def unready(self) -> tuple[str, str] | None:
        """The durable store refuses writes once a replica has failed (until a restart)."""
        store = self.store
        if isinstance(store, DurableStore):
            if store.journal is None:
                return "store", "the store is not running"
            if store.journal.failed is not None:
                return "store", f"a replica failed: {store.journal.failed}"
        return None

    async def run(self, *, task_status: trio.TaskStatus[EmbeddedBackend] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """Run the store (recovery first, for the durable one), then serve."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            task_status.started(self)


def _journal_families(store: DurableStore) -> Iterator[Metric]:
    """The journal's figures as metric families (zeros until the store has started)."""
    stats = store.journal.stats if store.journal is not None else None
    for name, documentation, value in (
            ("chatd_store_records", "Records appended to the journal (both replicas).",
             stats.records if stats else 0),
            ("chatd_store_batches", "Journal batches: each one write and fsync per replica.",
             stats.batches if stats else 0),
            ("chatd_store_fsyncs", "fsyncs of replica files (one per replica per batch).",
             stats.fsyncs if stats else 0)):
        yield CounterMetricFamily(name, documentation, value=value)
    commit = HistogramMetricFamily(
        "chatd_store_commit_seconds",
        "Time for a journal batch to be written and fsync'd on every replica.")
    if stats is not None:
        commit.add_metric([], stats.commit_seconds.cumulative(), stats.commit_seconds.total)
    yield commit
