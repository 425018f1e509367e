"""Group commit: many writers, one write and one fsync per replica per batch.

The :class:`Journal` is the writing half of the persistence actor. Writers hand it records
through its mailbox and wait; the actor takes every request that is waiting, gives each
record the next *log sequence number* (LSN), appends all of them to each replica's
:class:`SegmentLog` in one batch, fsyncs every replica (the replicas in parallel, each in a
worker thread), runs each request's ``apply`` hook in order, and only then releases the
writers. Requests that arrive while an fsync runs wait for the next batch, so under load one
fsync covers many writers, and no writer is released before an fsync that started after its
records were written. The same record has the same LSN on every replica, which is how
recovery merges replicas; and the same position (segment serial and offset): the replicas
are written identically, so that the store can keep one position per queued item and read
it from either replica. A replica whose records would land elsewhere than on the first is
failed.

A *checkpoint* request is committed alone, between batches (:class:`Checkpoint`): either
built by the store beforehand, covering the changes applied when it was taken (while the
journal went on writing), or built by a callback at that moment. The journal writes it to
every replica after a ``CK_BEGIN`` [snap, boundary] record (if asked, into a fresh segment
with the same serial on each, after which the segments before the boundary are deleted),
fsyncs, and tells the store where its records landed and which boundary holds. The
*boundary* is the first segment that may hold a change the checkpoint does not cover. A *delete*
request removes segments the store no longer needs, also between batches. That is how disk
space is given back.

Two replicas are both required. If either one fails (an I/O error), the journal stops
acknowledging: the batch in flight and every later request fail with
:class:`StoreUnavailable`, and nothing is retried, because a promise of "on both replicas"
can no longer be kept.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import cbor2
import trio

from chatd.actors import ActorTable, Mailbox
from chatd.backends._records import StoreUnavailable
from chatd.logs import EventLog
from chatd.metrics import Histogram

from ._format import CK_BEGIN
from ._segments import Block, Position, ReplicaFailed, SegmentLog, encode_block

if TYPE_CHECKING:
    from outcome import Outcome

__all__ = ["Checkpoint", "Journal", "JournalStats", "StoreUnavailable", "encode"]

logger = logging.getLogger(__name__)

#: A record to write: its type and the CBOR-able fields that follow its LSN.
Body = tuple[int, list[Any]]
#: Applies a write once it is durable, given where each of its records landed.
Apply = Callable[[list[Position]], None]


#: Told where a checkpoint's records landed (its ``CK_BEGIN`` left out), and the boundary
#: that holds (the segments before it are not needed by recovery any more).
Placed = Callable[[list[Position], int], None]


@attrs.frozen
class Checkpoint:
    """A snapshot of the store's state, as the journal writes it.

    Attributes:
        snap: The last LSN it covers: every change up to it and none after.
        boundary: The first segment that may hold a change after ``snap``.
        records: The records that restore the state, encoded (type, CBOR payload), from
            the first after ``CK_BEGIN`` (which the journal writes) to ``CK_END``.
        fresh: Write them into a new segment (the same serial on every replica), and
            delete the segments before the boundary once they are durable (every older
            one if nothing was written since ``snap``: the new segment is the boundary);
            else append them.
        placed: Called once they are durable.
    """

    snap: int
    boundary: int
    records: list[tuple[int, bytes]]
    fresh: bool
    placed: Placed | None = None


#: Builds a checkpoint between two batches: given the last LSN written (and applied), what
#: to write.
Snapshot = Callable[[int], Checkpoint]


def encode(records: Sequence[Body]) -> list[tuple[int, bytes]]:
    """Records (type, fields) as the journal writes them: (type, CBOR payload)."""
    return [(record_type, cbor2.dumps(fields)) for record_type, fields in records]


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
    __slots__ = ("apply", "delete", "done", "error", "records", "snapshot")

    def __init__(self, records: Sequence[Body], apply: Apply | None,
                 snapshot: Snapshot | Checkpoint | None = None,
                 delete: Sequence[int] = ()) -> None:
        self.records = records
        self.apply = apply
        self.snapshot = snapshot
        self.delete = delete
        self.done = trio.Event()
        self.error: StoreUnavailable | None = None

    @property
    def alone(self) -> bool:
        """Whether the request is committed on its own (a checkpoint or a deletion)."""
        return self.snapshot is not None or bool(self.delete)


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
        #: The last LSN whose write was applied: the store's state covers every change up
        #: to it, and none after, whenever the journal is not applying a batch.
        self.applied = next_lsn - 1
        self.stats = JournalStats()

    def close(self) -> None:
        """Release the journal's mailbox (the actor has stopped)."""
        self._actors.release(self._mailbox)

    @property
    def failed(self) -> str | None:
        """Why the journal stopped acknowledging, or None while it is healthy."""
        return self._failed

    async def write(self, records: Sequence[Body], apply: Apply | None = None) -> None:
        """Append ``records`` and return once they are fsync'd on every replica.

        Args:
            records: (type, fields) pairs; each is stored as the CBOR array [lsn, *fields].
            apply: Run after the fsync, before any later request is applied (so the
                store's state changes in log order), with each record's position.

        Raises:
            StoreUnavailable: A replica has failed; the records are not acknowledged.
        """
        await self._submit(_Request(records, apply))

    async def checkpoint(self, snapshot: Snapshot | Checkpoint) -> None:
        """Write a checkpoint between two batches: one built beforehand, or one that
        ``snapshot`` builds then (see :class:`Checkpoint`).

        Raises:
            StoreUnavailable: A replica has failed.
        """
        await self._submit(_Request((), None, snapshot))

    async def delete(self, serials: Sequence[int]) -> None:
        """Delete segments (none of them the current one) from every replica, between two
        batches.

        Raises:
            StoreUnavailable: A replica has failed.
        """
        if serials:
            await self._submit(_Request((), None, delete=serials))

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
            if first.alone:
                await self._commit_alone(first)
                continue
            batch = [first]
            while True:
                try:
                    request = self._mailbox.receive_nowait()
                except trio.WouldBlock:
                    break
                if request.alone:
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
        block = encode_block(encoded, self._logs[0].max_record)
        starts = await self._everywhere(lambda log: _append_and_sync(log, block))
        positions = block.positions(starts[0]) if starts else []
        self.stats.commit_seconds.observe(trio.current_time() - started)
        self.stats.batches += 1
        self.stats.records += len(encoded)
        at = 0
        for request in batch:
            self._release(request, positions[at:at + len(request.records)])
            at += len(request.records)
        if self._failed is None:
            self.applied = self.next_lsn - 1

    async def _commit_alone(self, request: _Request) -> None:
        if request.snapshot is None:
            serials = request.delete
            await self._everywhere(lambda log: _delete(log, serials))
            self._release(request, [])
            return
        snapshot, latest = request.snapshot, self.next_lsn - 1
        checkpoint = snapshot if isinstance(snapshot, Checkpoint) else snapshot(latest)
        serial, boundary = None, checkpoint.boundary
        if checkpoint.fresh:  # the same serial on every replica, above all of theirs
            serial = max(log.current_segment for log in self._logs) + 1
            if checkpoint.snap == latest:  # nothing after it: every older segment goes
                boundary = serial
        records = [(CK_BEGIN, cbor2.dumps([checkpoint.snap, boundary])), *checkpoint.records]
        positions = await self._everywhere(
            lambda log: _write_checkpoint(log, records, serial, boundary))
        self.stats.checkpoints += 1
        placed = checkpoint.placed
        request.apply = None if placed is None else (
            lambda positions: placed(positions[1:], boundary))
        self._release(request, positions)

    async def _everywhere(self, work: Callable[[SegmentLog], list[Position]]
                          ) -> list[Position]:
        """Run ``work`` on every replica in parallel worker threads, unless failed.

        The threads are started straight from trio's thread cache and report back through
        the trio token, without a nursery or ``trio.to_thread`` per replica: at one message
        per batch that machinery cost more CPU than the write. The journal waits for every
        thread even when cancelled (a write, once started, runs to its end).

        Returns:
            The positions ``work`` returned on the first replica (the same on every one;
            a replica where they differ is failed).
        """
        if self._failed is not None:
            return []
        logs = self._logs
        results: list[Outcome[list[Position]] | None] = [None] * len(logs)
        finished = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def arrived(at: int, result: Outcome[list[Position]]) -> None:
            results[at] = result
            if all(result is not None for result in results):
                finished.set()

        for at, log in enumerate(logs):
            trio.lowlevel.start_thread_soon(
                functools.partial(work, log),
                functools.partial(_report, token, arrived, at))
        with trio.CancelScope(shield=True):
            await finished.wait()
        positions: list[list[Position]] = []
        failure: ReplicaFailed | None = None
        for result in results:
            assert result is not None
            try:
                positions.append(result.unwrap())
            except ReplicaFailed as exc:
                failure = failure or exc
        astray = [] if failure is not None else [
            log for log, other in zip(logs[1:], positions[1:], strict=True)
            if other != positions[0]]
        if astray:
            failure = ReplicaFailed(f"replica {astray[0].directory} failed: its records "
                                    f"landed elsewhere than on {logs[0].directory}")
        if failure is not None:
            self._failed = str(failure)
            self._log.error("replica_failed", error="replica_failed", reason=self._failed)
            if self._on_failure is not None:
                self._on_failure()
            return []
        self.stats.fsyncs += len(logs)
        return positions[0]

    def _release(self, request: _Request, positions: list[Position]) -> None:
        if self._failed is not None:
            request.error = StoreUnavailable(self._failed)
        elif request.apply is not None:
            request.apply(positions)
        request.done.set()


def _report(token: trio.lowlevel.TrioToken,
            arrived: Callable[[int, Outcome[list[Position]]], None], at: int,
            result: Outcome[list[Position]]) -> None:
    """Hand a worker thread's outcome to the journal's task (called in that thread)."""
    token.run_sync_soon(arrived, at, result)


def _append_and_sync(log: SegmentLog, block: Block) -> list[Position]:
    """Write and fsync ``block``; where it starts (nothing for an empty block)."""
    if not block.offsets:
        return []
    start = log.append_block(block)
    log.sync()
    return [start]


def _write_checkpoint(log: SegmentLog, records: list[tuple[int, bytes]], serial: int | None,
                      boundary: int) -> list[Position]:
    """Write a checkpoint: into a fresh segment ``serial``, then deleting the segments before
    ``boundary``; or, without ``serial``, as any batch."""
    obsolete = []
    if serial is not None:
        log.start_segment(serial)
        obsolete = [older for older in log.segments() if older < boundary]
    positions = log.append(records)
    log.sync()
    _delete(log, obsolete)
    return positions


def _delete(log: SegmentLog, serials: Sequence[int]) -> list[Position]:
    for serial in serials:
        log.delete(serial)
    return []
