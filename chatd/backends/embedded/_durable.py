"""The durable store: the persistence actor on two replicated append-only logs.

State lives in a :class:`QueueIndex` in memory and in two replicas of a segment log on
disk (docs/storage.md). A change is written to both replicas and fsync'd by the
:class:`Journal` (group commit) before it is applied to the index, so nothing that a
caller was told succeeded exists only in memory.

Records (each a CBOR array, the LSN first):

- ``MSG``  [lsn, to, seq, id, from, body, ts] — a message queued for ``to``;
- ``ACK``  [lsn, user, status, upto, peer, receipts] — an acknowledgement and the receipts
  it queued, [[sender, seq, status, ids, ts], ...], as one record;
- ``KV`` [lsn, bucket, key, value, revision, expires] — a state record written (``value``
  null: removed) in a durable bucket, with its expiry in ms (0: none);
- checkpoint records, all carrying the LSN the snapshot covers: ``CK_BEGIN``, ``CK_USER``
  [snap, user, last_seq], ``CK_UNREAD`` [snap, user, [[seq, from, id], ...]],
  ``CK_ENTRY`` [snap, user, seq, "m", id, from, body, ts] or [..., "r", status, by, ids,
  ts],
  ``CK_IDS`` [snap, [[from, id, to, ts], ...]], ``CK_KV`` [snap, bucket, revision,
  [[key, value, revision, expires], ...]], ``CK_END`` [snap, count of the records between
  begin and end].

Types 3-6 were the replica records of a cluster that chatd no longer has; recovery skips
them with a warning.

Recovery reads both replicas, starts from the newest complete checkpoint found on either,
and replays the union of both replicas' later records in LSN order. Damage, a torn tail, or
any difference between the replicas is reported and repaired by writing a checkpoint of
the merged state to both at once.

A user's queued items whose records cannot be read from both replicas raise an alarm
(``replica_unreadable``, :attr:`DurableStore.unreadable`): at recovery, until the repair is
written; when a replica fails at run time, until a restart.

The record types, how they are written and how recovery reads them (which replica holds
which queued item, for that alarm, included) stay in this one module (about 600 lines), so
that a record's format is stated in one place.
"""

from __future__ import annotations

import enum
import functools
import heapq
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import cbor2
import trio

from chatd.actors import ActorTable
from chatd.backends._records import (
    Accepted,
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog

from ._index import IndexedStore, QueueIndex
from ._journal import Body, Journal
from ._kv import KVTable
from ._lock import DirectoryLock
from ._segments import SegmentLog

__all__ = ["DurableStore"]

logger = logging.getLogger(__name__)

class RecordType(enum.IntEnum):
    """The type of a record in the segment log (docs/storage.md)."""

    MSG = 1
    ACK = 2
    KV = 7
    CK_BEGIN = 10
    CK_USER = 11
    CK_UNREAD = 12
    CK_ENTRY = 13
    CK_IDS = 14
    CK_END = 15
    CK_KV = 16


MSG, ACK, KV = RecordType.MSG, RecordType.ACK, RecordType.KV
CK_BEGIN, CK_END = RecordType.CK_BEGIN, RecordType.CK_END
_CHANGES = frozenset((MSG, ACK, KV))
#: Record types of the removed cluster (PUT, REPLACE, UNREAD, KNOWN): skipped at recovery.
_RETIRED = frozenset((3, 4, 5, 6))
_CHECKPOINTED = frozenset((RecordType.CK_USER, RecordType.CK_UNREAD, RecordType.CK_ENTRY,
                           RecordType.CK_IDS, RecordType.CK_KV))
_CHUNK = 1000
#: Most user ids a ``replica_unreadable`` record lists.
_LISTED = 10

#: One replica's decoded records, (type, fields), in log order.
_Records = list[tuple[int, list[Any]]]
#: A complete checkpoint: the LSN it covers, and its records between begin and end.
_Checkpoint = tuple[int, _Records]


@attrs.define
class _Replay:
    """What recovery found, for the report and for deciding on a repair."""

    base: int = 0
    last_lsn: int = 0
    records: int = 0
    repair: list[str] = attrs.field(factory=list)


class DurableStore(IndexedStore):
    """The queues, and the durable state buckets, on two replicas of a segment log.

    Args:
        actors: The node's actor table.
        directories: The two replica directories.
        segment_bytes: Size at which a segment rolls.
        checkpoint_interval: Seconds between checks for a checkpoint (to give disk space
            back once queues are empty, or when the log has grown past a few segments).
        dedup_window, dedup_max, max_unread: As for :class:`QueueIndex`.
    """

    waits_for_io = True

    def __init__(self, actors: ActorTable, directories: Sequence[Path], *,
                 segment_bytes: int = 64 * 1024 * 1024, checkpoint_interval: float = 10.0,
                 dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        if len(directories) != 2:
            raise ValueError("the durable store needs exactly two replica directories")
        self._actors = actors
        self.directories = list(directories)
        self.segment_bytes = segment_bytes
        self.checkpoint_interval = checkpoint_interval
        self._new_index = functools.partial(QueueIndex, dedup_window=dedup_window,
                                            dedup_max=dedup_max, max_unread=max_unread)
        self.index = self._new_index()
        #: The durable state buckets' records (:mod:`chatd.backends.embedded._kv`).
        self.kv = KVTable()
        self.logs: list[SegmentLog] = []
        self.journal: Journal | None = None
        self._log = EventLog(logger, actors.node, "store")
        self._inflight: dict[tuple[str, str], trio.Event] = {}
        self._ack_locks: dict[str, trio.Lock] = {}
        self._wake = trio.Event()
        self._records_at_checkpoint = 0
        #: Users with queued items whose records cannot be read from both replicas: found
        #: by recovery (0 again once the repair is written to both), or every user with
        #: queued items once a replica has failed at run time (until a restart).
        self.unreadable = 0

    # -- the actor ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[DurableStore] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """Lock both replica directories, recover them, repair them if needed, then serve
        and checkpoint.

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
        self.logs = [SegmentLog(d, segment_bytes=self.segment_bytes) for d in self.directories]
        replay = await trio.to_thread.run_sync(self._recover)
        journal = self.journal = Journal(self._actors, self.logs, next_lsn=replay.last_lsn + 1,
                                         on_failure=self._replica_failed)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                if replay.repair:
                    self._log.warning("replicas_repaired", reasons=replay.repair)
                    await journal.checkpoint(self._snapshot)
                    if self.unreadable:  # readable from both again
                        cleared, self.unreadable = self.unreadable, 0
                        self._log.info("replica_unreadable_cleared", queues=cleared)
                self._records_at_checkpoint = journal.stats.records
                self._log.info("store_recovered", records=replay.records,
                               users=len(list(self.index.users())))
                task_status.started(self)
                await self._checkpointer()
                await trio.sleep_forever()
        finally:
            journal.close()
            for log in self.logs:
                log.close()

    async def _checkpointer(self) -> None:
        """Checkpoint when the log has grown past a few segments, or when the queues are
        empty and more has been written since the last checkpoint than a checkpoint
        holds (so that it gives space back rather than rewriting the same state)."""
        assert self.journal is not None
        while True:
            with trio.move_on_after(self.checkpoint_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            self.kv.sweep(now_ms())
            written = self.journal.stats.records - self._records_at_checkpoint
            live = len(self.index.ids) + self.kv.count()
            if written and ((self.index.pending_total == 0 and written >= live)
                            or self._segment_count() > 4):
                try:
                    await self.checkpoint()
                except StoreUnavailable:
                    # A replica failed (the journal logged it). The store stays up and
                    # refuses writes; restarting it would reopen the failed replica.
                    return

    async def checkpoint(self) -> None:
        """Write the live state to fresh segments and delete the older ones now."""
        assert self.journal is not None
        records = self.journal.stats.records
        await self.journal.checkpoint(self._snapshot)
        self._records_at_checkpoint = records

    def _segment_count(self) -> int:
        return len(self.logs[0].segments()) if self.logs else 0

    def _replica_failed(self) -> None:
        """The journal failed a replica: every queue with items now rests on one replica at
        most, and stays so until a restart recovers and repairs both."""
        waiting = self.index.waiting()
        self.unreadable = len(waiting)
        if not waiting:
            return
        for log in self.logs:
            if log.failed is not None:
                self._log.error("replica_unreadable", error="replica_unreadable",
                                replica=str(log.directory), queues=len(waiting),
                                items=self.index.pending_total,
                                user_ids=heapq.nsmallest(_LISTED, waiting))

    # -- the Queues interface -----------------------------------------------------------

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` durably unless its id was used; see
        :meth:`chatd.backends.Queues.submit`."""
        assert self.journal is not None
        index, key = self.index, (message.sender, message.id)
        while True:
            seen = index.seen(message, now_ms())
            if seen is not None:
                return Accepted(seen[1], True, None)
            inflight = self._inflight.get(key)
            if inflight is None:
                break
            await inflight.wait()  # the same id is being written: wait, then look again
        done = self._inflight[key] = trio.Event()
        entry = Entry(index.reserve(message.to), message)

        def apply() -> None:
            index.remember(message.sender, message.id, message.to, message.ts)
            index.add(message.to, entry)

        try:
            await self.journal.write([(MSG, [message.to, entry.seq, message.id, message.sender,
                                             message.body, message.ts])], apply)
        finally:
            del self._inflight[key]
            done.set()
        return Accepted(message.ts, False, entry)

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge durably, with the receipts; see :meth:`chatd.backends.Queues.acknowledge`."""
        assert self.journal is not None
        lock = self._ack_locks.setdefault(user, trio.Lock())
        try:
            async with lock:
                return await self._acknowledge(user, status, upto, peer)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._ack_locks.pop(user, None)

    async def _acknowledge(self, user: str, status: str, upto: int,
                           peer: str | None) -> list[tuple[str, Entry]]:
        assert self.journal is not None
        index = self.index
        plan = index.plan_ack(user, status, upto, peer, now_ms())
        if not plan.changed:
            return []
        queued = [(sender, Entry(index.reserve(sender), item)) for sender, item in plan.receipts]

        def apply() -> None:
            index.apply_ack(user, status, upto, peer)
            for sender, entry in queued:
                index.add(sender, entry)
            if index.pending_total == 0:
                self._wake.set()

        receipts = [[sender, entry.seq, *_receipt_fields(entry)] for sender, entry in queued]
        await self.journal.write([(ACK, [user, status, upto, peer, receipts])], apply)
        return queued

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
        batch: list[tuple[int, Message, Entry]] = []
        later: list[int] = []
        keys: set[tuple[str, str]] = set()
        now = now_ms()
        for at, message in enumerate(messages):
            key = (message.sender, message.id)
            if key in keys or key in self._inflight:
                later.append(at)
                continue
            try:
                seen = index.seen(message, now)
            except IdConflict as exc:
                results[at] = exc
                continue
            if seen is not None:
                results[at] = Accepted(seen[1], True, None)
                continue
            keys.add(key)
            batch.append((at, message, Entry(index.reserve(message.to), message)))
        if batch:
            await self._write_messages(batch, keys, results)
        for at in later:
            try:
                results[at] = await self.submit(messages[at])
            except (IdConflict, StoreUnavailable) as exc:
                results[at] = exc
        return [result for result in results if result is not None]

    async def _write_messages(self, batch: list[tuple[int, Message, Entry]],
                              keys: set[tuple[str, str]],
                              results: list[Accepted | Exception | None]) -> None:
        assert self.journal is not None
        index = self.index
        done = trio.Event()
        for key in keys:
            self._inflight[key] = done

        def apply() -> None:
            for _, message, entry in batch:
                index.remember(message.sender, message.id, message.to, message.ts)
                index.add(message.to, entry)

        try:
            await self.journal.write(
                [(MSG, [m.to, entry.seq, m.id, m.sender, m.body, m.ts]) for _, m, entry in batch],
                apply)
        except StoreUnavailable as exc:
            for at, _, _ in batch:
                results[at] = exc
        else:
            for at, message, entry in batch:
                results[at] = Accepted(message.ts, False, entry)
        finally:
            for key in keys:
                del self._inflight[key]
            done.set()

    # -- durable state buckets -----------------------------------------------------------

    async def commit_kv(self, records: Sequence[tuple[str, str, bytes | None, int, int]],
                        apply: Callable[[], None]) -> None:
        """Write state records to both replicas in one write, then ``apply`` them (see
        ``_kv.Commit``).

        Raises:
            StoreUnavailable: A replica failed; nothing changed.
        """
        assert self.journal is not None
        await self.journal.write([(KV, list(record)) for record in records], apply)

    # -- checkpoints ---------------------------------------------------------------------

    def _snapshot(self, snap: int) -> list[Body]:
        """The records that restore the index as it is now (all of it up to LSN ``snap``)."""
        records: list[Body] = [(CK_BEGIN, [snap])]
        for user, last_seq, entries, unread, acked in self.index.users():
            records.append((RecordType.CK_USER, [snap, user, last_seq, acked]))
            for start in range(0, len(unread), _CHUNK):
                chunk = [list(u) for u in unread[start:start + _CHUNK]]
                records.append((RecordType.CK_UNREAD, [snap, user, chunk]))
            for entry in entries:
                records.append((RecordType.CK_ENTRY,
                                [snap, user, entry.seq, *_kind_fields(entry)]))
        ids = [[sender, msg_id, to, ts]
               for (sender, msg_id), (to, ts, _) in self.index.ids.items()]
        for start in range(0, len(ids), _CHUNK):
            records.append((RecordType.CK_IDS, [snap, ids[start:start + _CHUNK]]))
        for bucket in self.kv.buckets():
            revision, kept = self.kv.dump(bucket)
            for start in range(0, max(1, len(kept)), _CHUNK):
                records.append((RecordType.CK_KV, [snap, bucket, revision,
                                                   kept[start:start + _CHUNK]]))
        # The count lets recovery tell a complete checkpoint from one with a damaged record.
        records.append((CK_END, [snap, len(records) - 1]))
        return records

    # -- recovery (runs in a worker thread, before the actor serves) --------------------

    def _recover(self) -> _Replay:
        replay = _Replay()
        decoded: list[list[tuple[int, list[Any]]]] = []
        for log in self.logs:
            records = []
            for record in log.recover():
                try:
                    fields = cbor2.loads(record.payload)
                except Exception:
                    fields = None
                if not isinstance(fields, list) or not fields or type(fields[0]) is not int:
                    replay.repair.append(f"undecodable record in {log.directory}")
                    continue
                records.append((record.type, fields))
            decoded.append(records)
            for damage in log.damage:
                self._log.error("replica_damaged", error="replica_damaged",
                                replica=str(log.directory), segment=damage.segment,
                                start=damage.start, end=damage.end, reason=damage.reason)
                replay.repair.append(f"damage in {log.directory}")
            if log.truncated:
                self._log.warning("torn_tail_truncated", replica=str(log.directory),
                                  bytes=log.truncated)
                replay.repair.append(f"torn tail in {log.directory}")
        checkpoints = [_latest_checkpoint(records) for records in decoded]
        best = max(checkpoints, key=lambda c: c[0] if c else -1)
        if best is not None:
            replay.base = best[0]
            self._load_checkpoint(best[1])
        present: list[set[int]] = []
        changes: dict[int, tuple[int, list[Any]]] = {}
        retired: set[int] = set()
        for records in decoded:
            lsns = set()
            for record_type, fields in records:
                if fields[0] <= replay.base:
                    continue
                if record_type in _CHANGES:
                    changes[fields[0]] = (record_type, fields)
                    lsns.add(fields[0])
                elif record_type in _RETIRED:
                    retired.add(fields[0])
                    lsns.add(fields[0])
            present.append(lsns)
        if retired:
            self._log.warning("retired_records_skipped", count=len(retired))
        replay.last_lsn = max([replay.base, *changes, *retired])
        lost = replay.last_lsn - replay.base - len(changes) - len(retired)
        if lost:
            self._log.error("records_lost", error="records_lost", count=lost)
        for lsn in sorted(changes):
            self._apply(*changes[lsn])
        replay.records = len(changes)
        lacking: list[tuple[SegmentLog, set[tuple[str, int]]]] = []
        for records, checkpoint, lsns, log in zip(decoded, checkpoints, present, self.logs,
                                                  strict=True):
            if lsns != set(changes) | retired or (
                    checkpoint[0] if checkpoint else 0) != replay.base:
                replay.repair.append(f"{log.directory} differs from its peer")
                lacking.append((log, self._unreadable_from(records, checkpoint, lsns, best,
                                                           replay.base, changes)))
        self._report_unreadable(lacking)
        if any(len(log.segments()) > 1 for log in self.logs) and not replay.repair:
            replay.repair.append("old segments")
        return replay

    def _unreadable_from(self, records: _Records, checkpoint: _Checkpoint | None,
                         lsns: set[int], best: _Checkpoint | None, base: int,
                         changes: dict[int, tuple[int, list[Any]]]) -> set[tuple[str, int]]:
        """The queued items that one replica could not give on its own.

        Those are the items added by a change the replica lacks, and, when it lacks the
        newest checkpoint, the items of that checkpoint which its own older checkpoint and
        changes do not add either. Runs once the merged state is in the index.

        Args:
            records: The replica's records.
            checkpoint: Its newest complete checkpoint.
            lsns: The LSNs of the changes it holds above ``base``.
            best: The newest complete checkpoint of either replica, which was loaded.
            base: The LSN ``best`` covers (0 without one).
            changes: Every change above ``base``, from either replica, by LSN.

        Returns:
            The items as (user, seq), among those still queued.
        """
        added = [key for lsn, change in changes.items() if lsn not in lsns
                 for key in _adds(*change)]
        snap = checkpoint[0] if checkpoint else 0
        if snap != base:
            assert best is not None  # base is the newest checkpoint's LSN, above 0
            own = {key for record in (checkpoint[1] if checkpoint else ())
                   for key in _adds(*record)}
            own.update(key for record_type, fields in records
                       if record_type in _CHANGES and snap < fields[0] <= base
                       for key in _adds(record_type, fields))
            added += [key for record in best[1] for key in _adds(*record) if key not in own]
        return {key for key in added if self.index.holds(*key)}

    def _report_unreadable(self, lacking: list[tuple[SegmentLog, set[tuple[str, int]]]]
                           ) -> None:
        """Set :attr:`unreadable` to the users concerned (0 when there are none), then log
        ``replica_unreadable`` for each replica that lacks queued items."""
        self.unreadable = len({user for _, items in lacking for user, _ in items})
        for log, items in lacking:
            if items:
                users = {user for user, _ in items}
                self._log.warning("replica_unreadable", replica=str(log.directory),
                                  queues=len(users), items=len(items),
                                  user_ids=heapq.nsmallest(_LISTED, users))

    def _load_checkpoint(self, records: list[tuple[int, list[Any]]]) -> None:
        index, now = self.index, now_ms()
        for record_type, fields in records:
            match record_type:
                case RecordType.CK_USER:
                    _, user, last_seq, *acked = fields
                    index.restore_user(user, last_seq, (), acked[0] if acked else 0)
                case RecordType.CK_UNREAD:
                    _, user, unread = fields
                    index.restore_user(user, 0, [tuple(u) for u in unread])
                case RecordType.CK_ENTRY:
                    _, user, seq, kind, *rest = fields
                    index.add(user, Entry(seq, _item(user, kind, rest)))
                case RecordType.CK_IDS:
                    for sender, msg_id, to, ts in fields[1]:
                        if ts + index.dedup_window_ms > now:
                            index.remember(sender, msg_id, to, ts)
                case RecordType.CK_KV:
                    _, bucket, revision, kept = fields
                    self.kv.restore_revision(bucket, revision)
                    for key, value, key_revision, expires in kept:
                        if not expires or expires > now:
                            self.kv.apply(bucket, key, value, key_revision, expires)

    def _apply(self, record_type: int, fields: list[Any]) -> None:
        index = self.index
        if record_type == MSG:
            _, to, seq, msg_id, sender, body, ts = fields
            if ts + index.dedup_window_ms > now_ms():
                index.remember(sender, msg_id, to, ts)
            index.add(to, Entry(seq, Message(msg_id, sender, to, body, ts)))
        elif record_type == KV:
            _, bucket, key, value, revision, expires = fields
            if expires and expires <= now_ms():
                value = None
            self.kv.apply(bucket, key, value, revision, expires)
        else:
            _, user, status, upto, peer, receipts = fields
            index.apply_ack(user, status, upto, peer)
            for sender, seq, state, ids, ts in receipts:
                index.add(sender, Entry(seq, ReceiptItem(state, user, tuple(ids), ts)))


def _latest_checkpoint(records: _Records) -> _Checkpoint | None:
    """The newest complete checkpoint (its LSN and records) in one replica's records.

    Complete means its end record was written and every record it counts was read back: a
    checkpoint with a damaged record inside is not used (the other replica's is).
    """
    latest = None
    current: list[tuple[int, list[Any]]] | None = None
    for record_type, fields in records:
        if record_type == CK_BEGIN:
            current = []
        elif record_type == CK_END and current is not None:
            if len(fields) == 2 and fields[1] == len(current):
                latest = (fields[0], current)
            current = None
        elif current is not None and record_type in _CHECKPOINTED:
            current.append((record_type, fields))
    return latest


def _adds(record_type: int, fields: list[Any]) -> list[tuple[str, int]]:
    """The queue items, as (user, seq), that a record adds: a message, an acknowledgement's
    receipts, or a checkpointed entry."""
    if record_type in (MSG, RecordType.CK_ENTRY):  # [lsn or snap, user, seq, ...]
        return [(fields[1], fields[2])]
    if record_type == ACK:  # [lsn, user, status, upto, peer, [[sender, seq, ...], ...]]
        return [(receipt[0], receipt[1]) for receipt in fields[5]]
    return []


def _fields(entry: Entry) -> list[Any]:
    item = entry.item
    if isinstance(item, Message):
        return [item.id, item.sender, item.body, item.ts]
    return [item.status, item.by, list(item.ids), item.ts]


def _kind_fields(entry: Entry) -> list[Any]:
    return ["m" if isinstance(entry.item, Message) else "r", *_fields(entry)]


def _receipt_fields(entry: Entry) -> list[Any]:
    item = entry.item
    assert isinstance(item, ReceiptItem)
    return [item.status, list(item.ids), item.ts]


def _item(user: str, kind: str, rest: list[Any]) -> Message | ReceiptItem:
    """The queue item of a checkpointed entry of ``user``'s queue."""
    if kind == "m":
        msg_id, sender, body, ts = rest
        return Message(msg_id, sender, user, body, ts)
    status, by, ids, ts = rest
    return ReceiptItem(status, by, tuple(ids), ts)
