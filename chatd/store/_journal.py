"""Group commit: many writers, one write and one fsync per replica per batch.

The :class:`Journal` is the writing half of the persistence actor. Writers hand it records
through its mailbox and wait; the actor takes every request that is waiting, appends all
their records to each replica's :class:`SegmentLog` in one batch, fsyncs every replica
(the replicas in parallel, each in a worker thread), and only then releases the writers.
Requests that arrive while an fsync runs wait for the next batch, so under load one fsync
covers many writers, and no writer is released before an fsync that started after its
records were written.

Two replicas are both required. If either one fails (an I/O error from write or fsync), the
journal stops acknowledging: the batch in flight and every later request fail with
:class:`StoreUnavailable`, and nothing is retried, because a promise of "on both replicas"
can no longer be kept. Reads from the surviving replica are the store's business.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

from chatd.actors import ActorTable, Mailbox
from chatd.logs import EventLog

from ._segments import Position, ReplicaFailed, SegmentLog

__all__ = ["Journal", "JournalStats", "StoreUnavailable"]

logger = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """A write could not be made durable on every replica; it was not acknowledged."""


@attrs.define
class JournalStats:
    """Counters for tests, benchmarks and metrics."""

    batches: int = 0
    records: int = 0
    fsyncs: int = 0


class _Request:
    __slots__ = ("done", "error", "positions", "records")

    def __init__(self, records: Sequence[tuple[int, bytes]]) -> None:
        self.records = records
        self.done = trio.Event()
        self.error: StoreUnavailable | None = None
        self.positions: list[list[Position]] = []


class Journal:
    """Appends records durably to every replica, sharing fsyncs among concurrent writers.

    Args:
        actors: The node's actor table (for the journal's mailbox).
        logs: One recovered :class:`SegmentLog` per replica.
        capacity: Requests that may wait for the next batch before writers wait to enqueue.
    """

    def __init__(self, actors: ActorTable, logs: Sequence[SegmentLog], *,
                 capacity: int = 65536) -> None:
        self._logs = list(logs)
        self._mailbox: Mailbox[_Request] = actors.open("journal", capacity)
        self._log = EventLog(logger, actors.node, "store")
        self._failed: str | None = None
        self.stats = JournalStats()

    @property
    def failed(self) -> str | None:
        """Why the journal stopped acknowledging, or None while it is healthy."""
        return self._failed

    async def write(self, records: Sequence[tuple[int, bytes]]) -> list[list[Position]]:
        """Append ``records`` (type, payload) and return once they are fsync'd everywhere.

        Returns:
            For each replica, the positions of the records, in order.

        Raises:
            StoreUnavailable: A replica has failed; the records are not acknowledged.
        """
        if self._failed is not None:
            raise StoreUnavailable(self._failed)
        request = _Request(records)
        await self._mailbox.deliver(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.positions

    async def run(self, *, task_status: trio.TaskStatus[Journal] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The actor loop: batch waiting requests, write, fsync, release."""
        task_status.started(self)
        while True:
            batch = [await self._mailbox.receive()]
            while True:
                try:
                    batch.append(self._mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._commit(batch)

    async def _commit(self, batch: list[_Request]) -> None:
        records = [record for request in batch for record in request.records]
        results: list[list[Position]] = [[] for _ in self._logs]
        if self._failed is None:
            try:
                async with trio.open_nursery() as nursery:
                    for index, log in enumerate(self._logs):
                        nursery.start_soon(self._write_replica, log, records, results, index)
            except* ReplicaFailed as group:
                self._failed = str(group.exceptions[0])
                self._log.error("replica_failed", error="replica_failed",
                                reason=self._failed)
        self.stats.batches += 1
        self.stats.records += len(records)
        start = 0
        for request in batch:
            if self._failed is not None:
                request.error = StoreUnavailable(self._failed)
            else:
                end = start + len(request.records)
                request.positions = [positions[start:end] for positions in results]
                start = end
            request.done.set()

    async def _write_replica(self, log: SegmentLog, records: list[tuple[int, bytes]],
                             results: list[list[Position]], index: int) -> None:
        def append_and_sync() -> list[Position]:
            positions = log.append(records)
            log.sync()
            return positions

        results[index] = await trio.to_thread.run_sync(append_and_sync)
        self.stats.fsyncs += 1
