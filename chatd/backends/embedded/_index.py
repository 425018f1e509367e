"""The in-memory state of a store: queues, unread messages, remembered message ids.

Both stores keep an index: the memory store a :class:`QueueIndex`, its only copy, with every
queued item in memory; the durable store a :class:`~._refs.RefIndex`, the state it rebuilds
from its log at start-up and updates as records are committed, which keeps only where each
queued item is on disk. What they share (:class:`BaseIndex`) is each user's sequence
numbers and unread messages, and the message-id memory. Every method is synchronous and
does no I/O, so a caller in trio sees it change atomically.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import attrs

from chatd.backends._acks import Unread, apply_ack, plan_receipts
from chatd.backends._records import (
    Accepted,
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    StoreUnavailable,
)

from ._ids import IdMemory, id_key

__all__ = ["Acked", "BaseIndex", "IndexedStore", "QueueIndex", "QueueState", "SentId"]

_SEQ = operator.itemgetter(0)

#: An entry as the index keeps it: ``(seq, ("m", *message))`` or ``(seq, ("r", *receipt))``.
#: Plain tuples of strings and integers on purpose: the cyclic garbage collector stops
#: tracking them, so a backlog of a million entries adds nothing to its full passes, which
#: pause the whole node (a full pass over attrs records took tens of milliseconds under
#: load). Entries are rebuilt as :class:`Entry` objects on the way out.
Stored = tuple[int, tuple[Any, ...]]


def _size(item: tuple[Any, ...]) -> int:
    """What a stored item counts in the backlog's bytes (``chatd_queue_backlog_bytes``): the
    UTF-8 size of a message's body, or of a receipt's message ids (ids are ASCII).

    The ids, sequence numbers and timestamps around it are left out: they cost about the
    same for every item, which the item count shows. An ASCII body (most are) is measured
    by len() alone, without being encoded.
    """
    if item[0] == "m":  # ("m", id, sender, to, body, ts)
        body = item[4]
        return len(body) if body.isascii() else len(body.encode())
    return sum(map(len, item[3]))  # ("r", status, by, ids, ts)


def _unpack(stored: Stored) -> Entry:
    seq, item = stored
    if item[0] == "m":
        return Entry(seq, Message(*item[1:]))
    return Entry(seq, ReceiptItem(*item[1:]))


#: A remembered message id as :meth:`BaseIndex.seen` gives it: (recipient, the message's
#: ts, when it is forgotten, in ms).
SentId = tuple[str, int, int]


@attrs.frozen(slots=True)
class Acked:
    """What an acknowledgement changed, and the receipts it produces for senders."""

    changed: bool
    receipts: tuple[tuple[str, ReceiptItem], ...]


class QueueState:
    """What every index keeps of one user: sequence numbers and delivered-unread messages.

    Each index's queue adds its items, in seq order, from position ``head`` of its lists or
    arrays on (the items before were acknowledged; they are dropped in bulk).
    """

    __slots__ = ("acked", "head", "last_seq", "reserved", "unread")

    def __init__(self) -> None:
        self.head = 0
        self.last_seq = 0
        self.reserved = 0
        self.acked = 0  # the highest seq acknowledged as delivered (or read)
        self.unread = Unread()


class _Queue(QueueState):
    """One user's queue in memory: ``entries[head:]``."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Stored] = []


Q = TypeVar("Q", bound=QueueState)


class BaseIndex(Generic[Q]):
    """Per-user sequence numbers and unread messages, and the message-id memory.

    Subclasses keep the queued items; :meth:`_queue` makes their kind of queue.

    Args:
        dedup_window: Seconds a message id is remembered for duplicate detection.
        dedup_max: Most message ids remembered at once; the oldest are forgotten first.
        max_unread: Most delivered-but-unread messages remembered per user.
    """

    def __init__(self, *, dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        self._queues: dict[str, Q] = {}
        self.dedup_window_ms = int(dedup_window * 1000)
        #: The remembered message ids (:mod:`._ids`).
        self.ids = IdMemory(dedup_max, self.dedup_window_ms)
        self._dedup_max = dedup_max
        self._max_unread = max_unread
        #: Items queued and not yet acknowledged, over every user's queue.
        self.pending_total = 0
        #: Their size, as :func:`_size` counts it (docs/operations.md,
        #: ``chatd_queue_backlog_bytes``).
        self.pending_bytes = 0

    def _queue(self, user: str) -> Q:
        """``user``'s queue, made empty if there was none."""
        raise NotImplementedError

    def queued(self, user: str) -> int:
        """How many items wait in ``user``'s queue."""
        raise NotImplementedError

    @property
    def dedup_max(self) -> int:
        """Most message ids remembered at once."""
        return self._dedup_max

    def __len__(self) -> int:
        """How many users the index knows (with items queued or not)."""
        return len(self._queues)

    # -- message ids -------------------------------------------------------------------

    def seen(self, message: Message, now: int) -> tuple[int, SentId | None]:
        """The key of ``message``'s (sender, id) (:func:`~._ids.id_key`), and what is
        remembered of it, if anything; expired ids are forgotten first.

        Raises:
            IdConflict: The id was used for another recipient.
        """
        self.ids.forget(now)
        key = id_key(message.sender, message.id)
        seen = self.ids.get(key)
        if seen is not None and seen[0] != message.to:
            raise IdConflict(message.id)
        return key, seen

    def remember(self, key: int, to: str, ts: int) -> None:
        """Remember a message id (by its key, :meth:`seen`'s) until ``ts`` plus the dedup
        window, forgetting the oldest if ``dedup_max`` are remembered already (so that a
        recovery replaying many messages never holds more)."""
        self.ids.add(key, to, ts)

    def forget_ids(self, now: int) -> None:
        """Forget the expired ids (:meth:`seen` does before it looks; recovery once it
        replayed every change)."""
        self.ids.forget(now)

    # -- sequence numbers ------------------------------------------------------------

    def reserve(self, user: str) -> int:
        """The next sequence number of ``user``, taken now (never given twice)."""
        queue = self._queue(user)
        queue.reserved = max(queue.reserved, queue.last_seq) + 1
        return queue.reserved

    def last_seq(self, user: str) -> int:
        """The highest sequence number committed for ``user`` (0 if none)."""
        queue = self._queues.get(user)
        return queue.last_seq if queue else 0

    def acked(self, user: str) -> int:
        """The highest seq ``user`` acknowledged (0 if none)."""
        queue = self._queues.get(user)
        return queue.acked if queue else 0

    def restore_user(self, user: str, last_seq: int,
                     unread: Sequence[tuple[int, str, str]], acked: int = 0) -> None:
        """Set a user's counters and unread messages from a snapshot."""
        queue = self._queue(user)
        queue.last_seq = max(queue.last_seq, last_seq)
        queue.reserved = max(queue.reserved, last_seq)
        queue.acked = max(queue.acked, acked)
        queue.unread = Unread(unread)

    def _unread(self, queue: QueueState) -> list[tuple[int, str, str]]:
        """A queue's unread messages as ``(seq, sender, id)``, for a snapshot."""
        return list(queue.unread)


class QueueIndex(BaseIndex[_Queue]):
    """Per-user queues with every item in process memory, and the message-id memory (the
    memory store's only copy)."""

    def _queue(self, user: str) -> _Queue:
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = _Queue()
        return queue

    # -- queues ------------------------------------------------------------------------

    def add(self, user: str, entry: Entry) -> None:
        """Queue ``entry`` for ``user`` in its place by seq."""
        queue = self._queue(user)
        item = entry.item
        if isinstance(item, Message):
            stored: Stored = (entry.seq, ("m", *item))
            # _size of a message, written out: this is every send's path.
            body = item.body
            self.pending_bytes += len(body) if body.isascii() else len(body.encode())
        else:
            stored = (entry.seq, ("r", *item))
            self.pending_bytes += _size(stored[1])
        if queue.entries and queue.entries[-1][0] > entry.seq:
            bisect.insort(queue.entries, stored, lo=queue.head, key=_SEQ)
        else:
            queue.entries.append(stored)
        queue.last_seq = max(queue.last_seq, entry.seq)
        queue.reserved = max(queue.reserved, entry.seq)
        self.pending_total += 1

    def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries with ``seq > after``, in order."""
        queue = self._queues.get(user)
        if queue is None:
            return ()
        start = bisect.bisect_right(queue.entries, after, lo=queue.head, key=_SEQ)
        return [_unpack(stored) for stored in queue.entries[start:start + limit]]

    def queued(self, user: str) -> int:
        """How many items wait in ``user``'s queue."""
        queue = self._queues.get(user)
        return len(queue.entries) - queue.head if queue else 0

    def holds(self, user: str, seq: int) -> bool:
        """Whether ``user``'s queue holds the item ``seq`` (queued, not acknowledged)."""
        queue = self._queues.get(user)
        if queue is None:
            return False
        entries = queue.entries
        at = bisect.bisect_left(entries, seq, lo=queue.head, key=_SEQ)
        return at < len(entries) and entries[at][0] == seq

    def waiting(self) -> list[str]:
        """The users whose queue holds items (one pass over every user)."""
        return [user for user, queue in self._queues.items() if len(queue.entries) > queue.head]

    def plan_ack(self, user: str, status: str, upto: int, peer: str | None,
                 ts: int) -> Acked:
        """What an acknowledgement would change, without changing anything.

        ``delivered`` covers every queued item with ``seq <= upto``; ``read`` covers the
        same, then the delivered-but-unread messages with ``seq <= upto`` (only ``peer``'s
        when given), after the oldest unread beyond ``max_unread`` are forgotten.

        Returns:
            Whether anything would change, and the receipts it produces, by sender, with at
            most MAX_RECEIPT_IDS ids each.
        """
        queue = self._queues.get(user)
        if queue is None:
            return Acked(False, ())
        entries = queue.entries
        end = bisect.bisect_right(entries, upto, lo=queue.head, key=_SEQ)
        receipts = plan_receipts(user, status, upto, peer, ts, _newly(entries[queue.head:end]),
                                 queue.unread, self._max_unread)
        read = any(receipt.status == "read" for _, receipt in receipts)
        return Acked(end > queue.head or read, receipts)

    def apply_ack(self, user: str, status: str, upto: int, peer: str | None) -> None:
        """Make the change :meth:`plan_ack` describes."""
        queue = self._queues.get(user)
        if queue is None:
            return
        entries, head = queue.entries, queue.head
        end = bisect.bisect_right(entries, upto, lo=head, key=_SEQ)
        removed = entries[head:end]
        newly = _newly(removed)
        self.pending_total -= end - head
        self.pending_bytes -= sum([_size(item) for _, item in removed])
        if end * 2 > len(entries):  # at least half acknowledged: drop them (amortized O(1))
            del entries[:end]
            end = 0
        queue.head = end
        queue.acked = max(queue.acked, min(upto, queue.last_seq))
        apply_ack(status, upto, peer, newly, queue.unread, self._max_unread)

    # -- snapshots ---------------------------------------------------------------------

    def users(self) -> Iterator[tuple[str, int, Sequence[Entry], list[tuple[int, str, str]],
                                      int]]:
        """Every user's (user, last_seq, pending entries, unread [seq, sender, id], acked)."""
        for user, queue in self._queues.items():
            yield (user, queue.last_seq, [_unpack(stored) for stored in queue.entries[queue.head:]],
                   self._unread(queue), queue.acked)


def _newly(stored: Sequence[Stored]) -> list[tuple[int, str, str]]:
    """The messages among stored entries, as ``(seq, sender, id)``."""
    # A stored message is (seq, ("m", id, sender, to, body, ts)).
    return [(seq, item[2], item[1]) for seq, item in stored if item[0] == "m"]


class IndexedStore:
    """What both embedded stores share: the counters, answered from their index without
    waiting, and runs of sends submitted one by one."""

    index: BaseIndex[Any]

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message``; see :meth:`chatd.backends.Queues.submit`."""
        raise NotImplementedError

    async def submit_many(self, messages: Sequence[Message]) -> list[Accepted | Exception]:
        """Submit each message in turn; see :meth:`chatd.backends.Queues.submit_many`."""
        results: list[Accepted | Exception] = []
        for message in messages:
            try:
                results.append(await self.submit(message))
            except (IdConflict, StoreUnavailable) as exc:
                results.append(exc)
        return results

    async def open(self, user: str) -> None:
        """Nothing to prepare: every queue is in the index."""

    def close(self, user: str) -> None:
        """Nothing to release."""

    async def last_seq(self, user: str) -> int:
        """The highest sequence number committed for ``user`` (0 if none)."""
        return self.index.last_seq(user)

    def queued(self, user: str) -> int:
        """How many items wait in ``user``'s queue (for tests and metrics)."""
        return self.index.queued(user)
