"""The in-memory store: the :class:`Store` interface kept in dicts, lost on restart.

It serves tests and benchmarks, and single-node deployments that accept losing queued
messages when the daemon stops. Every operation completes without waiting, so the
persistence "actor" here has no mailbox: its ``run`` only marks it started.
"""

from __future__ import annotations

import bisect
import collections
import operator
from collections.abc import Sequence

import attrs
import trio

from ._interface import (
    Accepted,
    Acknowledged,
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    Store,
)

__all__ = ["MemoryStore"]

_SEQ = operator.attrgetter("seq")


class _Queue:
    """One user's queue: entries ``entries[head:]`` in seq order, plus unread messages."""

    __slots__ = ("entries", "head", "last_seq", "unread")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.head = 0
        self.last_seq = 0
        self.unread: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()


@attrs.frozen
class _Sent:
    to: str
    ts: int
    expires: float


class MemoryStore:
    """Queues and message-id memory in process memory.

    Args:
        dedup_window: Seconds a message id is remembered for duplicate detection.
        dedup_max: Most message ids remembered at once; the oldest are forgotten first.
        max_unread: Most delivered-but-unread messages remembered per user; past it the
            oldest are forgotten and will never produce a READ receipt.
    """

    def __init__(self, *, dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        self._queues: dict[str, _Queue] = {}
        self._ids: collections.OrderedDict[tuple[str, str], _Sent] = collections.OrderedDict()
        self._dedup_window = dedup_window
        self._dedup_max = dedup_max
        self._max_unread = max_unread

    async def run(self, *, task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mark the store started; there is nothing to run."""
        task_status.started(self)
        await trio.sleep_forever()

    def _queue(self, user: str) -> _Queue:
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = _Queue()
        return queue

    def _append(self, user: str, item: Message | ReceiptItem) -> Entry:
        queue = self._queue(user)
        queue.last_seq += 1
        entry = Entry(queue.last_seq, item)
        queue.entries.append(entry)
        return entry

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` unless its id was used; see :meth:`Store.submit`."""
        key = (message.sender, message.id)
        now = trio.current_time()
        self._forget_ids(now)
        seen = self._ids.get(key)
        if seen is not None:
            if seen.to != message.to:
                raise IdConflict(message.id)
            return Accepted(seen.ts, True, None)
        self._ids[key] = _Sent(message.to, message.ts, now + self._dedup_window)
        return Accepted(message.ts, False, self._append(message.to, message))

    def _forget_ids(self, now: float) -> None:
        ids = self._ids
        while ids and (len(ids) > self._dedup_max or next(iter(ids.values())).expires < now):
            ids.popitem(last=False)

    async def enqueue(self, user: str, item: ReceiptItem) -> Entry:
        """Queue a receipt for ``user``."""
        return self._append(user, item)

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries with ``seq > after``, in order."""
        queue = self._queues.get(user)
        if queue is None:
            return ()
        start = bisect.bisect_right(queue.entries, after, lo=queue.head, key=_SEQ)
        return queue.entries[start:start + limit]

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> Acknowledged:
        """Acknowledge items up to ``upto``; see :meth:`Store.acknowledge`."""
        queue = self._queues.get(user)
        if queue is None:
            return Acknowledged()
        delivered = []
        entries = queue.entries
        head = queue.head
        while head < len(entries) and entries[head].seq <= upto:
            item = entries[head].item
            if isinstance(item, Message):
                delivered.append((item.sender, item.id))
                queue.unread[entries[head].seq] = (item.sender, item.id)
            head += 1
        if head > 1024 and head * 2 > len(entries):
            del entries[:head]
            head = 0
        queue.head = head
        while len(queue.unread) > self._max_unread:
            queue.unread.popitem(last=False)
        read = []
        if status == "read":
            for seq, (sender, msg_id) in list(queue.unread.items()):
                if seq > upto:
                    break
                if peer is None or sender == peer:
                    del queue.unread[seq]
                    read.append((sender, msg_id))
        return Acknowledged(tuple(delivered), tuple(read))

    def last_seq(self, user: str) -> int:
        """The highest sequence number given to ``user`` (0 if none)."""
        queue = self._queues.get(user)
        return queue.last_seq if queue else 0

    def queued(self, user: str) -> int:
        """How many items wait in ``user``'s queue (for tests and metrics)."""
        queue = self._queues.get(user)
        return len(queue.entries) - queue.head if queue else 0

