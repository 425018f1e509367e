"""The durable store: the persistence actor on two replicated append-only logs.

State lives in a :class:`QueueIndex` in memory and in two replicas of a segment log on
disk (docs/storage.md). A change is written to both replicas and fsync'd by the
:class:`Journal` (group commit) before it is applied to the index, so nothing that a
caller was told succeeded exists only in memory.

Records (each a CBOR array, the LSN first):

- ``MSG``  [lsn, to, seq, id, from, body, ts] — a message queued for ``to``;
- ``ACK``  [lsn, user, status, upto, peer, receipts] — an acknowledgement and the receipts
  it queued, [[sender, seq, status, ids, ts], ...], as one record;
- ``PUT`` [lsn, user, seq, kind, *fields] — an entry replicated from another node (kind
  and fields as in ``CK_ENTRY``);
- ``REPLACE`` [lsn, user, last_seq, acked, count] — the user's queue is set anew (a merge
  of the cluster's replicas), by this record and the ``count`` records that follow it in
  the same batch: ``UNREAD`` [lsn, user, [[seq, from, id], ...]], ``KNOWN`` [lsn, user,
  [[from, id, ts], ...]] and ``PUT`` records. Recovery applies the group whole or not at
  all: a group torn by a crash leaves the queue as it was;
- checkpoint records, all carrying the LSN the snapshot covers: ``CK_BEGIN``, ``CK_USER``
  [snap, user, last_seq], ``CK_UNREAD`` [snap, user, [[seq, from, id], ...]],
  ``CK_ENTRY`` [snap, user, seq, "m", id, from, body, ts] or [..., "r", status, by, ids,
  ts],
  ``CK_IDS`` [snap, [[from, id, to, ts], ...]], ``CK_END`` [snap, count of the records
  between begin and end].

Recovery reads both replicas, starts from the newest complete checkpoint found on either,
and replays the union of both replicas' later records in LSN order. Damage, a torn tail, or
any difference between the replicas is reported and repaired by writing a checkpoint of
the merged state to both at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cbor2
import trio

from chatd.actors import ActorTable
from chatd.clock import now_ms
from chatd.logs import EventLog

from ._index import IndexedStore, QueueIndex, UserState
from ._interface import Accepted, Entry, Message, ReceiptItem, Store, StoreUnavailable
from ._journal import Body, Journal
from ._segments import SegmentLog

__all__ = ["DurableStore"]

logger = logging.getLogger(__name__)

MSG, ACK, PUT, REPLACE, UNREAD, KNOWN = 1, 2, 3, 4, 5, 6
_CHANGES = frozenset((MSG, ACK, PUT, REPLACE, UNREAD, KNOWN))
CK_BEGIN, CK_USER, CK_UNREAD, CK_ENTRY, CK_IDS, CK_END = 10, 11, 12, 13, 14, 15
_CHUNK = 1000


@attrs.define
class _Replay:
    """What recovery found, for the report and for deciding on a repair."""

    base: int = 0
    last_lsn: int = 0
    records: int = 0
    repair: list[str] = attrs.field(factory=list)


class DurableStore(IndexedStore):
    """The :class:`Store` on two replicas of a segment log.

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
        self.logs: list[SegmentLog] = []
        self.journal: Journal | None = None
        self._log = EventLog(logger, actors.node, "store")
        self._inflight: dict[tuple[str, str], trio.Event] = {}
        self._ack_locks: dict[str, trio.Lock] = {}
        self._wake = trio.Event()
        self._records_at_checkpoint = 0

    # -- the actor ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Recover both replicas, repair them if needed, then serve and checkpoint."""
        self.index = self._new_index()
        self.logs = [SegmentLog(d, segment_bytes=self.segment_bytes) for d in self.directories]
        replay = await trio.to_thread.run_sync(self._recover)
        journal = self.journal = Journal(self._actors, self.logs, next_lsn=replay.last_lsn + 1)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(journal.run)
                if replay.repair:
                    self._log.warning("replicas_repaired", reasons=replay.repair)
                    await journal.checkpoint(self._snapshot)
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
        """Checkpoint when queues are empty or the log has grown past a few segments."""
        assert self.journal is not None
        while True:
            with trio.move_on_after(self.checkpoint_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            written = self.journal.stats.records - self._records_at_checkpoint
            if written and (self.index.pending_total == 0 or self._segment_count() > 4):
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

    # -- the Store interface ------------------------------------------------------------

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` durably unless its id was used; see :meth:`Store.submit`."""
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
        """Acknowledge durably, with the receipts; see :meth:`Store.acknowledge`."""
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

    # -- replicas (chatd.cluster places each queue on two nodes) --------------------------

    async def put(self, user: str, entries: Sequence[Entry]) -> None:
        """Store entries replicated from another node; see :meth:`ReplicaStore.put`."""
        assert self.journal is not None
        index = self.index

        def apply() -> None:
            for entry in entries:
                index.put(user, entry)

        await self.journal.write([(PUT, [user, entry.seq, *_kind_fields(entry)])
                                  for entry in entries], apply)

    async def acknowledge_only(self, user: str, status: str, upto: int, peer: str | None
                               ) -> list[tuple[str, ReceiptItem]]:
        """Acknowledge without queuing receipts; see :meth:`ReplicaStore.acknowledge_only`."""
        assert self.journal is not None
        lock = self._ack_locks.setdefault(user, trio.Lock())
        try:
            async with lock:
                index = self.index
                plan = index.plan_ack(user, status, upto, peer, now_ms())
                if not plan.changed and upto <= index.acked(user):
                    return []

                def apply() -> None:
                    index.apply_ack(user, status, upto, peer)
                    if index.pending_total == 0:
                        self._wake.set()

                await self.journal.write([(ACK, [user, status, upto, peer, []])], apply)
                return list(plan.receipts)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._ack_locks.pop(user, None)

    async def replace(self, states: Mapping[str, UserState]) -> None:
        """Set users' queues anew; see :meth:`ReplicaStore.replace`."""
        assert self.journal is not None
        records: list[Body] = []
        for user, state in states.items():
            group: list[Body] = []
            for start in range(0, len(state.unread), _CHUNK):
                group.append((UNREAD, [user, [list(u) for u in
                                              state.unread[start:start + _CHUNK]]]))
            for start in range(0, len(state.known), _CHUNK):
                group.append((KNOWN, [user, [list(k) for k in
                                             state.known[start:start + _CHUNK]]]))
            group.extend((PUT, [user, entry.seq, *_kind_fields(entry)])
                         for entry in state.entries)
            records.append((REPLACE, [user, state.last_seq, state.acked, len(group)]))
            records.extend(group)
        index = self.index

        def apply() -> None:
            for user, state in states.items():
                index.replace(user, state)

        await self.journal.write(records, apply)

    # -- checkpoints ---------------------------------------------------------------------

    def _snapshot(self, snap: int) -> list[Body]:
        """The records that restore the index as it is now (all of it up to LSN ``snap``)."""
        records: list[Body] = [(CK_BEGIN, [snap])]
        for user, last_seq, entries, unread, acked in self.index.users():
            records.append((CK_USER, [snap, user, last_seq, acked]))
            for start in range(0, len(unread), _CHUNK):
                chunk = [list(u) for u in unread[start:start + _CHUNK]]
                records.append((CK_UNREAD, [snap, user, chunk]))
            for entry in entries:
                records.append((CK_ENTRY, [snap, user, entry.seq, *_kind_fields(entry)]))
        ids = [[sender, msg_id, to, ts]
               for (sender, msg_id), (to, ts, _) in self.index.ids.items()]
        for start in range(0, len(ids), _CHUNK):
            records.append((CK_IDS, [snap, ids[start:start + _CHUNK]]))
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
        for records in decoded:
            lsns = set()
            for record_type, fields in records:
                if record_type in _CHANGES and fields[0] > replay.base:
                    changes[fields[0]] = (record_type, fields)
                    lsns.add(fields[0])
            present.append(lsns)
        replay.last_lsn = max([replay.base, *changes])
        lost = replay.last_lsn - replay.base - len(changes)
        if lost:
            self._log.error("records_lost", error="records_lost", count=lost)
        for lsn, (record_type, fields) in list(changes.items()):
            if record_type == REPLACE and lsn in changes:
                group = range(lsn, lsn + 1 + fields[4])
                if not all(n in changes for n in group):
                    for n in group:  # torn by a crash: the queue stays as it was
                        changes.pop(n, None)
                    replay.repair.append(f"a replace of {fields[1]} torn by a crash")
        for lsn in sorted(changes):
            self._apply(*changes[lsn])
        replay.records = len(changes)
        for checkpoint, lsns, log in zip(checkpoints, present, self.logs, strict=True):
            if lsns != set(changes) or (checkpoint[0] if checkpoint else 0) != replay.base:
                replay.repair.append(f"{log.directory} differs from its peer")
        if any(len(log.segments()) > 1 for log in self.logs) and not replay.repair:
            replay.repair.append("old segments")
        return replay

    def _load_checkpoint(self, records: list[tuple[int, list[Any]]]) -> None:
        index, now = self.index, now_ms()
        for record_type, fields in records:
            match record_type:
                case 11:  # CK_USER
                    _, user, last_seq, *acked = fields
                    index.restore_user(user, last_seq, (), acked[0] if acked else 0)
                case 12:  # CK_UNREAD
                    _, user, unread = fields
                    index.restore_user(user, 0, [tuple(u) for u in unread])
                case 13:  # CK_ENTRY
                    _, user, seq, kind, *rest = fields
                    index.add(user, Entry(seq, _item(user, kind, rest)))
                case 14:  # CK_IDS
                    for sender, msg_id, to, ts in fields[1]:
                        if ts + index.dedup_window_ms > now:
                            index.remember(sender, msg_id, to, ts)

    def _apply(self, record_type: int, fields: list[Any]) -> None:
        index = self.index
        if record_type == MSG:
            _, to, seq, msg_id, sender, body, ts = fields
            if ts + index.dedup_window_ms > now_ms():
                index.remember(sender, msg_id, to, ts)
            index.add(to, Entry(seq, Message(msg_id, sender, to, body, ts)))
        elif record_type == PUT:
            _, user, seq, kind, *rest = fields
            index.put(user, Entry(seq, _item(user, kind, rest)))
        elif record_type == REPLACE:
            _, user, last_seq, acked, _ = fields
            index.replace(user, UserState(last_seq, acked, (), (), ()))
        elif record_type == UNREAD:
            index.restore_user(fields[1], 0, [tuple(u) for u in fields[2]])
        elif record_type == KNOWN:
            now = now_ms()
            for sender, msg_id, ts in fields[2]:
                if ts + index.dedup_window_ms > now:
                    index.remember(sender, msg_id, fields[1], ts)
        else:
            _, user, status, upto, peer, receipts = fields
            index.apply_ack(user, status, upto, peer)
            for sender, seq, state, ids, ts in receipts:
                index.add(sender, Entry(seq, ReceiptItem(state, user, tuple(ids), ts)))


def _latest_checkpoint(records: list[tuple[int, list[Any]]]
                       ) -> tuple[int, list[tuple[int, list[Any]]]] | None:
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
        elif current is not None and CK_USER <= record_type <= CK_IDS:
            current.append((record_type, fields))
    return latest


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
