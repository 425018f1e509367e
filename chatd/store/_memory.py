"""The in-memory store: the :class:`Store` interface kept in process memory, lost on stop.

It serves tests and benchmarks, and deployments that accept losing queued messages when
the daemon stops (``store = "memory"``). Every operation completes without waiting, so the
persistence "actor" here has no mailbox: its ``run`` only marks it started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import trio

from chatd.clock import now_ms

from ._index import IndexedStore, QueueIndex, UserState
from ._interface import Accepted, Entry, Message, ReceiptItem, Store

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

    def __init__(self, *, dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        self.index = QueueIndex(dedup_window=dedup_window, dedup_max=dedup_max,
                                max_unread=max_unread)

    async def run(self, *, task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mark the store started; there is nothing to run."""
        task_status.started(self)
        await trio.sleep_forever()

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` unless its id was used; see :meth:`Store.submit`."""
        index = self.index
        seen = index.seen(message, now_ms())
        if seen is not None:
            return Accepted(seen[1], True, None)
        index.remember(message.sender, message.id, message.to, message.ts)
        entry = Entry(index.reserve(message.to), message)
        index.add(message.to, entry)
        return Accepted(message.ts, False, entry)

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge items up to ``upto``; see :meth:`Store.acknowledge`."""
        index = self.index
        plan = index.plan_ack(user, status, upto, peer, now_ms())
        index.apply_ack(user, status, upto, peer)
        queued = []
        for sender, receipt in plan.receipts:
            entry = Entry(index.reserve(sender), receipt)
            index.add(sender, entry)
            queued.append((sender, entry))
        return queued

    async def put(self, user: str, entries: Sequence[Entry]) -> None:
        """Store entries replicated from another node; see :meth:`ReplicaStore.put`."""
        for entry in entries:
            self.index.put(user, entry)

    async def acknowledge_only(self, user: str, status: str, upto: int, peer: str | None
                               ) -> list[tuple[str, ReceiptItem]]:
        """Acknowledge without queuing receipts; see :meth:`ReplicaStore.acknowledge_only`."""
        plan = self.index.plan_ack(user, status, upto, peer, now_ms())
        self.index.apply_ack(user, status, upto, peer)
        return list(plan.receipts)

    async def replace(self, states: Mapping[str, UserState]) -> None:
        """Set users' queues anew; see :meth:`ReplicaStore.replace`."""
        for user, state in states.items():
            self.index.replace(user, state)
