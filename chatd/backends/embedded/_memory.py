"""The in-memory store: the queues kept in process memory, lost on stop.

It serves tests and benchmarks, and deployments that accept losing queued messages when
the daemon stops (``store = "memory"``). Every operation completes without waiting, so the
persistence "actor" here has no mailbox: its ``run`` only marks it started.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from chatd.backends._records import Accepted, Entry, Message
from chatd.clock import now_ms

from ._index import IndexedStore, QueueIndex

__all__ = ["MemoryStore"]


class MemoryStore(IndexedStore):
    """Queues and message-id memory in process memory.

    Args:
        dedup_window: Seconds a message id is remembered for duplicate detection.
        dedup_max: Most message ids remembered at once; the oldest are forgotten first.
        max_unread: Most delivered-but-unread messages remembered per user; past it the
            oldest are forgotten and will never produce a READ receipt.
    """

    waits_for_io = False
    index: QueueIndex

    def __init__(self, *, dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        self.index = QueueIndex(dedup_window=dedup_window, dedup_max=dedup_max,
                                max_unread=max_unread)

    async def run(self, *, task_status: trio.TaskStatus[MemoryStore] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mark the store started; there is nothing to run."""
        task_status.started(self)
        await trio.sleep_forever()

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries with ``seq > after``, in order."""
        return self.index.pending(user, after, limit)

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` unless its id was used; see :meth:`Queues.submit`."""
        index = self.index
        key, seen = index.seen(message, now_ms())
        if seen is not None:
            return Accepted(seen[1], True, None)
        index.remember(key, message.to, message.ts)
        entry = Entry(index.reserve(message.to), message)
        index.add(message.to, entry)
        return Accepted(message.ts, False, entry)

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge items up to ``upto``; see :meth:`Queues.acknowledge`."""
        index = self.index
        plan = index.plan_ack(user, status, upto, peer, now_ms())
        index.apply_ack(user, status, upto, peer)
        queued = []
        for sender, receipt in plan.receipts:
            entry = Entry(index.reserve(sender), receipt)
            index.add(sender, entry)
            queued.append((sender, entry))
        return queued
