"""Group commit: many writers, one write and one fsync per replica per batch.

The :class:`Journal` is the writing half of the persistence actor. Writers hand it records
through its mailbox and wait; the actor takes every request that is waiting, gives each
record the next *log sequence number* (LSN), appends all of them to each replica's
:class:`SegmentLog` in one batch, fsyncs every replica (the replicas in parallel, each in a
worker thread), runs each request's ``apply`` hook in order, and only then releases the
writers. Requests that arrive while an fsync runs wait for the next batch, so under load one
fsync covers many writers, and no writer is released before an fsync that started after its
records were written. The same record has the same LSN on every replica, which is how
recovery merges replicas.

A *checkpoint* request is committed alone, between batches: the journal asks the store for
a snapshot of its live state at that moment, writes it to a fresh segment of every replica,
fsyncs, and deletes every older segment. That is how disk space is given back.

Two replicas are both required. If either one fails (an I/O error), the journal stops
acknowledging: the batch in flight and every later request fail with
:class:`StoreUnavailable`, and nothing is retried, because a promise of "on both replicas"
can no longer be kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import cbor2
import trio

from chatd.actors import ActorTable, Mailbox
from chatd.backends._records import StoreUnavailable
from chatd.logs import EventLog
from chatd.metrics import Histogram

from ._segments import ReplicaFailed, SegmentLog

__all__ = ["Journal", "JournalStats", "StoreUnavailable"]

logger = logging.getLogger(__name__)

#: A record to write: its type and the CBOR-able fields that follow its LSN.
Body = tuple[int, list[Any]]
#: Builds a checkpoint: given the last LSN it covers, the records that restore the state.
Snapshot = Callable[[int], list[Body]]


@attrs.define
class JournalStats:
    """Counters for tests, benchmarks and metrics."""

    batches: int = 0
    records: int = 0
    fsyncs: int = 0
    checkpoints: int = 0
    #: Seconds each batch took to be written and fsync'd on every replica.
    commit_seconds: Histogram = attrs.field(factory=Histogram)


class _Request:
    __slots__ = ("apply", "done", "error", "records", "snapshot")

    def __init__(self, records: Sequence[Body], apply: Callable[[], None] | None,
                 snapshot: Snapshot | None = None) -> None:
        self.records = records
        self.apply = apply
        self.snapshot = snapshot
        self.done = trio.Event()
        self.error: StoreUnavailable | None = None


class Journal:
    """Appends records durably to every replica, sharing fsyncs among concurrent writers.

    Args:
        actors: The node's actor table (for the journal's mailbox).
        logs: One recovered :class:`SegmentLog` per replica.
        next_lsn: The LSN the next record gets (one past the highest recovered).
        capacity: Requests that may wait for the next batch before writers wait to enqueue.
        on_failure: Called once, in the journal's task, when a replica fails (after
            ``replica_failed`` is logged, before any writer is told).
    """

    def __init__(self, actors: ActorTable, logs: Sequence[SegmentLog], *, next_lsn: int = 1,
                 capacity: int = 65536, on_failure: Callable[[], None] | None = None) -> None:
        self._logs = list(logs)
        self._actors = actors
        self._mailbox: Mailbox[_Request] = actors.open("journal", capacity)
        self._log = EventLog(logger, actors.node, "store")
        self._failed: str | None = None
        self._held: _Request | None = None
        self._on_failure = on_failure
        self.next_lsn = next_lsn
        self.stats = JournalStats()

    def close(self) -> None:
        """Release the journal's mailbox (the actor has stopped)."""
        self._actors.release(self._mailbox)

    @property
    def failed(self) -> str | None:
        """Why the journal stopped acknowledging, or None while it is healthy."""
        return self._failed

    async def write(self, records: Sequence[Body], apply: Callable[[], None] | None = None
                    ) -> None:
        """Append ``records`` and return once they are fsync'd on every replica.

        Args:
            records: (type, fields) pairs; each is stored as the CBOR array [lsn, *fields].
            apply: Run after the fsync, before any later request is applied (so the
                store's state changes in log order).

        Raises:
            StoreUnavailable: A replica has failed; the records are not acknowledged.
        """
        await self._submit(_Request(records, apply))

    async def checkpoint(self, snapshot: Snapshot) -> None:
        """Write a snapshot of the live state to fresh segments, then drop older segments.

        Raises:
            StoreUnavailable: A replica has failed.
        """
        await self._submit(_Request((), None, snapshot))

    async def _submit(self, request: _Request) -> None:
        if self._failed is not None:
            raise StoreUnavailable(self._failed)
        await self._mailbox.deliver(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error

    async def run(self, *, task_status: trio.TaskStatus[Journal] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The actor loop: batch waiting requests, write, fsync, apply, release."""
        task_status.started(self)
        while True:
            first = self._held or await self._mailbox.receive()
            self._held = None
            if first.snapshot is not None:
                await self._commit_checkpoint(first)
                continue
            batch = [first]
            while True:
                try:
                    request = self._mailbox.receive_nowait()
                except trio.WouldBlock:
                    break
                if request.snapshot is not None:
                    self._held = request
                    break
                batch.append(request)
            await self._commit(batch)

    async def _commit(self, batch: list[_Request]) -> None:
        encoded = []
        for request in batch:
            for record_type, fields in request.records:
                encoded.append((record_type, cbor2.dumps([self.next_lsn, *fields])))
                self.next_lsn += 1
        started = trio.current_time()
        await self._everywhere(lambda log: _append_and_sync(log, encoded))
        self.stats.commit_seconds.observe(trio.current_time() - started)
        self.stats.batches += 1
        self.stats.records += len(encoded)
        self._release(batch)

    async def _commit_checkpoint(self, request: _Request) -> None:
        assert request.snapshot is not None
        records = [(record_type, cbor2.dumps(fields))
                   for record_type, fields in request.snapshot(self.next_lsn - 1)]
        await self._everywhere(lambda log: _rewrite(log, records))
        self.stats.checkpoints += 1
        self._release([request])

    async def _everywhere(self, work: Callable[[SegmentLog], None]) -> None:
        """Run ``work`` on every replica in parallel worker threads, unless failed."""
        if self._failed is not None:
            return
        try:
            async with trio.open_nursery() as nursery:
                for log in self._logs:
                    nursery.start_soon(trio.to_thread.run_sync, work, log)
        except* ReplicaFailed as group:
            self._failed = str(group.exceptions[0])
            self._log.error("replica_failed", error="replica_failed", reason=self._failed)
            if self._on_failure is not None:
                self._on_failure()
        else:
            self.stats.fsyncs += len(self._logs)

    def _release(self, batch: list[_Request]) -> None:
        for request in batch:
            if self._failed is not None:
                request.error = StoreUnavailable(self._failed)
            elif request.apply is not None:
                request.apply()
            request.done.set()


def _append_and_sync(log: SegmentLog, records: list[tuple[int, bytes]]) -> None:
    if records:
        log.append(records)
        log.sync()


def _rewrite(log: SegmentLog, records: list[tuple[int, bytes]]) -> None:
    """Write a checkpoint into a fresh segment, then delete every older segment."""
    log.start_segment()
    older = [serial for serial in log.segments() if serial < log.current_segment]
    log.append(records)
    log.sync()
    for serial in older:
        log.delete(serial)
