"""The durable store: the persistence actor on two replicated append-only logs.

Every queued item, and every other change, is a record in two replicas of a segment log on
disk (docs/storage.md; the records are described in :mod:`._format`). A change is written
to both replicas and fsync'd by the :class:`Journal` (group commit) before it is applied to
the index in memory, so nothing that a caller was told succeeded exists only in memory.

The index (:class:`RefIndex`) holds each user's sequence numbers, unread messages and the
message-id memory, but of a queued item only where its record is: the journal writes both
replicas identically, so one position serves both. A backlog is read back from disk when
it is streamed, through a small cache (:mod:`._bodies`); a read that fails on the first
replica is served by the second and raises the ``replica_unreadable`` alarm for the user.

Checkpoints hold the index, not the items. In the background, the store writes one when
enough has been written since the last (:meth:`DurableStore.checkpoint` with ``rewrite``
false), deletes the segments before it that hold no queued item, and *compacts* the mostly
dead ones: it copies their queued items forward (``MOVE`` records), at most
``compact_rate`` bytes a second, then deletes them. A checkpoint that rewrites every queued
item into a fresh segment on both replicas, and deletes every older segment, is what
repairs the replicas after recovery found them different (:mod:`._recovery`).

A user's queued items whose records cannot be read from both replicas raise an alarm
(``replica_unreadable``, :attr:`DurableStore.unreadable`): at recovery, until the repair is
written; when a replica fails at run time, or a read fails on one, until a restart.

The module is about 570 lines: the actor, its writes with their ``apply`` hooks, the reads
back and the alarm share one state, so they stay together; the records' format,
recovery, checkpoints and compaction are modules of their own.
"""

from __future__ import annotations

import functools
import heapq
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from chatd.actors import ActorTable
from chatd.backends._records import (
    Accepted,
    Entry,
    IdConflict,
    Message,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog

from ._bodies import CACHE_BYTES, CACHE_ITEMS, Bodies, BodyCache
from ._checkpoints import copy_index, encode_index, full_records, read_queues
from ._compaction import Compactor, Maintenance, Segments
from ._format import ACK, KV, MSG, item_size, receipt_fields
from ._index import IndexedStore
from ._journal import Checkpoint, Journal, encode
from ._kv import KVTable
from ._lock import DirectoryLock
from ._recovery import recover
from ._refs import Newly, Ref, RefIndex
from ._segments import Position, SegmentLog

__all__ = ["DurableStore"]

logger = logging.getLogger(__name__)

#: Most user ids a ``replica_unreadable`` record lists.
_LISTED = 10
#: A checkpoint is written once this many records were written since the last one, or
#: fewer when the state it holds is smaller (so that recovery replays at most about this
#: many records, and a checkpoint never costs more than the writes it follows); or once
#: more than :data:`CHECKPOINT_SEGMENTS` segments were started since (so that they can be
#: deleted or compacted).
CHECKPOINT_RECORDS = 250_000
CHECKPOINT_SEGMENTS = 4
#: Messages read at once to acknowledge them.
_ACK_READS = 1024


class DurableStore(IndexedStore):
    """The queues, and the durable state buckets, on two replicas of a segment log.

    Args:
        actors: The node's actor table.
        directories: The two replica directories.
        segment_bytes: Size at which a segment rolls.
        checkpoint_interval: Seconds between rounds of background work: a checkpoint if
            one is due, compaction, deleting segments nothing needs.
        dedup_window, dedup_max, max_unread: As for :class:`~._index.BaseIndex`.
        cache_items, cache_bytes: Bounds of the cache of items read back or written
            (:class:`BodyCache`).
        compact_rate: Most bytes a second compaction copies.
    """

    waits_for_io = True
    index: RefIndex

    def __init__(self, actors: ActorTable, directories: Sequence[Path], *,
                 segment_bytes: int = 64 * 1024 * 1024, checkpoint_interval: float = 10.0,
                 dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000, cache_items: int = CACHE_ITEMS,
                 cache_bytes: int = CACHE_BYTES, compact_rate: int = 4 * 1024 * 1024) -> None:
        if len(directories) != 2:
            raise ValueError("the durable store needs exactly two replica directories")
        self._actors = actors
        self.directories = list(directories)
        self.segment_bytes = segment_bytes
        self.checkpoint_interval = checkpoint_interval
        self.compact_rate = compact_rate
        self.bodies = Bodies(self.directories, BodyCache(cache_items, cache_bytes))
        self._new_index = functools.partial(RefIndex, read=self._read_entries,
                                            dedup_window=dedup_window, dedup_max=dedup_max,
                                            max_unread=max_unread)
        self.index = self._new_index()
        #: The durable state buckets' records (:mod:`chatd.backends.embedded._kv`).
        self.kv = KVTable()
        self.logs: list[SegmentLog] = []
        self.journal: Journal | None = None
        self._compactor: Compactor | None = None
        #: The segments on either replica, and where the newest checkpoint starts.
        self.segments = Segments()
        #: What the background work (checkpoints, compaction) has done.
        self.maintenance = Maintenance()
        self._log = EventLog(logger, actors.node, "store")
        self._inflight: dict[tuple[str, str], trio.Event] = {}
        self._ack_locks: dict[str, trio.Lock] = {}
        self._wake = trio.Event()
        self._records_at_checkpoint = 0
        #: One checkpoint at a time: the background's and one asked for (a repair's).
        self._checkpointing = trio.Lock()
        #: Users with queued items whose records cannot be read from both replicas: found
        #: by recovery (none again once the repair is written to both), every user with
        #: queued items once a replica has failed at run time, and those whose items a
        #: read found on one replica only (until a restart).
        self._unreadable: set[str] = set()
        #: Per replica, the users for whom a read of it failed (the alarm is logged once).
        self._failed_reads: tuple[set[str], set[str]] = (set(), set())

    @property
    def unreadable(self) -> int:
        """How many users have queued items that cannot be read from both replicas."""
        return len(self._unreadable)

    # -- the actor ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[DurableStore] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """Lock both replica directories, recover them, repair them if needed, then serve
        and maintain them.

        Raises:
            DirectoryInUse: Another process serves from one of the directories.
        """
        locks = [DirectoryLock(d) for d in self.directories]
        try:
            for lock in locks:
                lock.acquire()
            await self._serve(task_status)
        finally:
            for lock in locks:
                lock.release()

    async def _serve(self, task_status: trio.TaskStatus[DurableStore]) -> None:
        self.index = self._new_index()
        self.kv.clear()
        self.bodies.cache.clear()
        self._failed_reads = (set(), set())
        self.logs = [SegmentLog(d, segment_bytes=self.segment_bytes) for d in self.directories]
        replay = await trio.to_thread.run_sync(recover, self.logs, self.index, self.kv,
                                               self.bodies, self._log)
        self.segments = Segments(replay.segments, replay.checkpoint_segment)
        self._report_unreadable(replay.lacking)
        journal = self.journal = Journal(self._actors, self.logs, next_lsn=replay.last_lsn + 1,
                                         on_failure=self._replica_failed)
        self._compactor = Compactor(self.index, journal, self.segments, self._entries,
                                    self.directories[0], self.compact_rate, self.maintenance)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                if replay.repair:
                    self._log.warning("replicas_repaired", reasons=replay.repair)
                    await self._rewrite()
                    if self._unreadable:  # readable from both again
                        cleared = len(self._unreadable)
                        self._unreadable.clear()
                        self._log.info("replica_unreadable_cleared", queues=cleared)
                self._records_at_checkpoint = journal.stats.records
                self._log.info("store_recovered", records=replay.records,
                               users=len(self.index))
                task_status.started(self)
                await self._maintain()
                await trio.sleep_forever()
        finally:
            journal.close()
            for log in self.logs:
                log.close()

    def _replica_failed(self) -> None:
        """The journal failed a replica: every queue with items now rests on one replica at
        most, and stays so until a restart recovers and repairs both."""
        waiting = self.index.waiting()
        self._unreadable.update(waiting)
        if not waiting:
            return
        for log in self.logs:
            if log.failed is not None:
                self._log.error("replica_unreadable", error="replica_unreadable",
                                replica=str(log.directory), queues=len(waiting),
                                items=self.index.pending_total,
                                user_ids=heapq.nsmallest(_LISTED, waiting))

    def _report_unreadable(self, lacking: list[tuple[SegmentLog, set[tuple[str, int]]]]
                           ) -> None:
        """Raise the alarm for the users whose items a replica lacks at recovery, then log
        ``replica_unreadable`` for each replica that lacks queued items."""
        self._unreadable = {user for _, items in lacking for user, _ in items}
        for log, items in lacking:
            if items:
                users = {user for user, _ in items}
                self._log.warning("replica_unreadable", replica=str(log.directory),
                                  queues=len(users), items=len(items),
                                  user_ids=heapq.nsmallest(_LISTED, users))

    # -- the Queues interface -----------------------------------------------------------

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries with ``seq > after``, in order, read back from
        disk (or the cache).

        Raises:
            StoreUnavailable: One of them can be read from neither replica.
        """
        refs = self.index.refs(user, after, limit)
        return await self._entries(user, refs) if refs else ()

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` durably unless its id was used; see
        :meth:`chatd.backends.Queues.submit`."""
        assert self.journal is not None
        index, key = self.index, (message.sender, message.id)
        while True:
            digest, seen = index.seen(message, now_ms())
            if seen is not None:
                return Accepted(seen[1], True, None)
            inflight = self._inflight.get(key)
            if inflight is None:
                break
            await inflight.wait()  # the same id is being written: wait, then look again
        done = self._inflight[key] = trio.Event()
        entry = Entry(index.reserve(message.to), message)

        def apply(positions: list[Position]) -> None:
            index.remember(digest, message.to, message.ts)
            self._queue(message.to, entry, positions[0])

        try:
            await self.journal.write([(MSG, [message.to, entry.seq, message.id, message.sender,
                                             message.body, message.ts])], apply)
        finally:
            del self._inflight[key]
            done.set()
        return Accepted(message.ts, False, entry)

    def _queue(self, user: str, entry: Entry, position: Position) -> None:
        """Queue ``entry`` of ``user`` whose record was written at ``position`` (in a
        journal ``apply``), and keep it in the cache."""
        size = item_size(entry.item)
        self.index.add(user, entry.seq, position, size, not isinstance(entry.item, Message))
        self.bodies.cache.put(user, entry, size)
        self.segments.serials.add(position.segment)

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge durably, with the receipts; see :meth:`chatd.backends.Queues.acknowledge`."""
        assert self.journal is not None
        lock = self._ack_locks.get(user)
        if lock is None:
            lock = self._ack_locks[user] = trio.Lock()
        try:
            try:  # uncontended, as nearly always: no trip through the scheduler
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                return await self._acknowledge(user, status, upto, peer)
            finally:
                lock.release()
        finally:
            if not lock.locked():  # a release hands the lock to a waiter, if any
                self._ack_locks.pop(user, None)

    async def _acknowledge(self, user: str, status: str, upto: int,
                           peer: str | None) -> list[tuple[str, Entry]]:
        assert self.journal is not None
        index = self.index
        refs = index.message_refs(user, upto)
        newly = self._newly_cached(user, refs)
        while newly is None:  # read the messages leaving; again if the queue changed meanwhile
            newly = await self._newly(user, refs)
            again = index.message_refs(user, upto)
            if [seq for seq, _, _ in again] != [seq for seq, _, _ in refs]:
                refs, newly = again, None
        plan = index.plan_ack(user, status, upto, peer, now_ms(), newly)
        if not plan.changed:
            return []
        queued = [(sender, Entry(index.reserve(sender), item)) for sender, item in plan.receipts]

        def apply(positions: list[Position]) -> None:
            removed = index.apply_ack(user, status, upto, peer, newly, self.bodies.messages_now)
            self.bodies.cache.forget(user, removed)
            for sender, entry in queued:
                self._queue(sender, entry, positions[0])
            if index.pending_total == 0:
                self._wake.set()

        receipts = [[sender, entry.seq, *receipt_fields(item)]
                    for (sender, item), (_, entry) in zip(plan.receipts, queued, strict=True)]
        await self.journal.write([(ACK, [user, status, upto, peer, receipts])], apply)
        return queued

    def _newly_cached(self, user: str, refs: list[Ref]) -> Newly | None:
        """The (seq, sender, id) of the messages at ``refs`` if the cache holds them all
        (an acknowledgement of what was just delivered: no read, no wait), else None."""
        newly: Newly = []
        get = self.bodies.cache.get
        for seq, _, _ in refs:
            entry = get(user, seq)
            if entry is None:
                return None
            item = entry.item
            assert isinstance(item, Message)  # message_refs gives messages only
            newly.append((seq, item.sender, item.id))
        return newly

    async def _newly(self, user: str, refs: list[Ref]) -> Newly:
        """The (seq, sender, id) of the messages at ``refs``, read a batch at a time."""
        newly: Newly = []
        for start in range(0, len(refs), _ACK_READS):
            for entry in await self._entries(user, refs[start:start + _ACK_READS]):
                item = entry.item
                assert isinstance(item, Message)  # message_refs gives messages only
                newly.append((entry.seq, item.sender, item.id))
        return newly

    async def submit_many(self, messages: Sequence[Message]) -> list[Accepted | Exception]:
        """Queue a run of messages in one journal write: one fsync round for all of them.

        Sequence numbers are taken in the order given, so one sender's messages keep their
        order. A message whose id is being written by another request right now, or that
        repeats an id earlier in the run, is submitted alone afterwards (it is a duplicate,
        or waits for the outcome of the write that has its id).
        """
        journal, index = self.journal, self.index
        assert journal is not None
        results: list[Accepted | Exception | None] = [None] * len(messages)
        batch: list[tuple[int, Message, Entry, int]] = []
        later: list[int] = []
        keys: set[tuple[str, str]] = set()
        now = now_ms()
        for at, message in enumerate(messages):
            key = (message.sender, message.id)
            if key in keys or key in self._inflight:
                later.append(at)
                continue
            try:
                digest, seen = index.seen(message, now)
            except IdConflict as exc:
                results[at] = exc
                continue
            if seen is not None:
                results[at] = Accepted(seen[1], True, None)
                continue
            keys.add(key)
            batch.append((at, message, Entry(index.reserve(message.to), message), digest))
        if batch:
            await self._write_messages(batch, keys, results)
        for at in later:
            try:
                results[at] = await self.submit(messages[at])
            except (IdConflict, StoreUnavailable) as exc:
                results[at] = exc
        return [result for result in results if result is not None]

    async def _write_messages(self, batch: list[tuple[int, Message, Entry, int]],
                              keys: set[tuple[str, str]],
                              results: list[Accepted | Exception | None]) -> None:
        assert self.journal is not None
        index = self.index
        done = trio.Event()
        for key in keys:
            self._inflight[key] = done

        def apply(positions: list[Position]) -> None:
            for (_, message, entry, digest), position in zip(batch, positions, strict=True):
                index.remember(digest, message.to, message.ts)
                self._queue(message.to, entry, position)

        try:
            await self.journal.write(
                [(MSG, [m.to, entry.seq, m.id, m.sender, m.body, m.ts])
                 for _, m, entry, _ in batch],
                apply)
        except StoreUnavailable as exc:
            for at, _, _, _ in batch:
                results[at] = exc
        else:
            for at, message, entry, _ in batch:
                results[at] = Accepted(message.ts, False, entry)
        finally:
            for key in keys:
                del self._inflight[key]
            done.set()

    # -- reading queued items back -------------------------------------------------------

    async def _entries(self, user: str, refs: list[Ref]) -> list[Entry]:
        """The items of ``user``'s queue at ``refs``, read back (:class:`Bodies`).

        An item whose reference changed while it was read (compaction moved it) is read
        again where it is now; one acknowledged meanwhile may be left out. A read that
        failed on one replica raises the ``replica_unreadable`` alarm for the user.

        Raises:
            StoreUnavailable: An item still queued at its reference can be read from
                neither replica.
        """
        found: dict[int, Entry] = {}
        failures = [0, 0]
        while refs:
            retry = []
            for ref, (entry, failed) in zip(refs, await self.bodies.read(user, refs),
                                            strict=True):
                if failed:
                    now = self.index.ref(user, ref[0])
                    if now != ref:  # moved or acknowledged meanwhile: not a damaged replica
                        if now is not None:
                            retry.append(now)
                        continue
                    for replica in (0, 1):
                        failures[replica] += failed >> replica & 1
                if entry is not None:
                    found[entry.seq] = entry
            refs = retry
        for replica, count in enumerate(failures):
            if count:
                self._read_failed(user, replica, count)
        if min(failures):  # some item failed on both
            raise StoreUnavailable(f"queued items of {user} cannot be read from either replica")
        return [found[seq] for seq in sorted(found)]

    def _read_failed(self, user: str, replica: int, items: int) -> None:
        """A read of ``user``'s items failed on ``replica``: raise the alarm for the user
        (logged once per replica and user)."""
        self._unreadable.add(user)
        if user not in self._failed_reads[replica]:
            self._failed_reads[replica].add(user)
            self._log.error("replica_unreadable", error="replica_unreadable",
                            replica=str(self.directories[replica]), queues=1, items=items,
                            user_ids=[user])

    def _read_entries(self, user: str, refs: Sequence[Ref]) -> list[Entry]:
        """The items at ``refs`` that either replica gives, read now (for
        :meth:`RefIndex.users`)."""
        return [entry for entry, _ in self.bodies.read_now(user, refs) if entry is not None]

    # -- durable state buckets -----------------------------------------------------------

    async def commit_kv(self, records: Sequence[tuple[str, str, bytes | None, int, int]],
                        apply: Callable[[], None]) -> None:
        """Write state records to both replicas in one write, then ``apply`` them (see
        ``_kv.Commit``).

        Raises:
            StoreUnavailable: A replica failed; nothing changed.
        """
        assert self.journal is not None
        await self.journal.write([(KV, list(record)) for record in records],
                                 lambda positions: apply())

    # -- checkpoints and compaction --------------------------------------------------

    async def checkpoint(self, *, rewrite: bool = True) -> None:
        """Write a checkpoint now.

        Args:
            rewrite: Rewrite every queued item, bodies included, into a fresh segment on
                both replicas and delete every older segment (what a repair does). If
                false, write only the index (where each queued item is) and delete the
                segments before it that hold no queued item (what the store does in the
                background).

        Raises:
            StoreUnavailable: A replica failed.
        """
        assert self.journal is not None and self._compactor is not None
        async with self._checkpointing:
            records = self.journal.stats.records
            if rewrite:
                await self._rewrite()
            else:
                await self.journal.checkpoint(await self._index_checkpoint())
                await self._compactor.delete_obsolete()
            self._records_at_checkpoint = records
            self.maintenance.checkpoints += 1

    async def compact(self) -> None:
        """Delete the segments before the newest checkpoint that hold no queued item; copy
        forward the items still queued in those that are more than half dead (at most
        ``compact_rate`` bytes a second), then delete them too (:class:`Compactor`).

        Raises:
            StoreUnavailable: A replica failed.
        """
        assert self._compactor is not None
        await self._compactor.compact()

    async def _index_checkpoint(self) -> Checkpoint:
        """A checkpoint of the index as it is now (every change up to the journal's last
        applied LSN): every queued item by reference, copied at once, then encoded while
        the node and the journal go on (:func:`encode_index`). Into a fresh segment when
        nothing is queued, so that the older ones go."""
        assert self.journal is not None
        snap = self.journal.applied
        # Every record in a segment before the one being written now was applied: a batch
        # is only written once the one before it was applied.
        boundary = self.logs[0].current_segment
        fresh = self.index.pending_total == 0
        copy = copy_index(self.index, self.kv)
        records = await encode_index(copy, snap)
        segments = self.segments
        return Checkpoint(snap, boundary, records, fresh, lambda positions, kept: (
            segments.checkpointed(positions, kept, fresh=fresh)))

    async def _rewrite(self) -> None:
        """Rewrite every queued item, and the rest of the state, into a fresh segment on
        both replicas, and delete every older segment.

        The items are read first, in a worker thread (from the first replica that gives
        each); those queued meanwhile are taken from the cache, or read when the
        checkpoint is written. An item neither replica gives is dropped
        (``records_lost``).
        """
        assert self.journal is not None
        queues = [(user, arrays) for user, _, _, _, arrays in self.index.queues()]
        read = await trio.to_thread.run_sync(read_queues, queues, self._read_entries)
        await self.journal.checkpoint(functools.partial(self._full_snapshot, read))

    def _full_snapshot(self, read: dict[tuple[str, int], Entry], snap: int) -> Checkpoint:
        """A checkpoint of the whole state with every queued item in it, into a fresh
        segment."""
        full = full_records(self.index, self.kv, snap, read, self.bodies.cache.get,
                            self._read_entries)

        def placed(positions: list[Position], boundary: int) -> None:
            full.place(self.index, positions)
            self.segments.checkpointed(positions, boundary, fresh=True)
            if full.lost:
                self._log.error("records_lost", error="records_lost", count=full.lost)

        return Checkpoint(snap, self.logs[0].current_segment, encode(full.records), True,
                          placed)

    async def _maintain(self) -> None:
        """Every ``checkpoint_interval`` (and as soon as the queues empty): a checkpoint of
        the index if one is due, then compaction."""
        assert self.journal is not None
        while True:
            with trio.move_on_after(self.checkpoint_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            self.kv.sweep(now_ms())
            written = self.journal.stats.records - self._records_at_checkpoint
            live = self.index.pending_total + len(self.index.ids) + self.kv.count()
            try:
                if written and (written >= min(live, CHECKPOINT_RECORDS)
                                or self.segments.since_checkpoint() > CHECKPOINT_SEGMENTS):
                    await self.checkpoint(rewrite=False)
                await self.compact()
            except StoreUnavailable:
                # A replica failed (the journal logged it). The store stays up and
                # refuses writes; restarting it would reopen the failed replica.
                return
