"""What the persistence actor keeps, and the small interface every store implements.

A store holds, per user, a FIFO *queue* of items waiting for that user's acknowledgement:
messages sent to them and receipts for messages they sent. Each item gets the next number
of the user's sequence when it is queued; numbers only grow and are never reused. Items
leave the queue when the user acknowledges them as delivered. Messages acknowledged as
delivered but not yet read are remembered (sender and id only) so that a later read
acknowledgement can produce READ receipts.

The store also remembers which message ids each sender has used, for a window, so that
sending the same id twice never creates a second message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from ._index import QueueIndex, UserState

__all__ = [
    "Accepted",
    "Entry",
    "IdConflict",
    "Item",
    "Message",
    "ReceiptItem",
    "ReplicaStore",
    "Store",
    "StoreUnavailable",
]


# Items are named tuples (cheap to build, immutable); the index keeps them as plain tuples,
# which the garbage collector stops tracking (see chatd/store/_index.py).


class Message(NamedTuple):
    """A message as accepted from its sender."""

    id: str
    sender: str
    to: str
    body: str
    ts: int


class ReceiptItem(NamedTuple):
    """A receipt queued for the sender of the messages ``ids``: ``by`` reached ``status``."""

    status: str
    by: str
    ids: tuple[str, ...]
    ts: int


Item = Message | ReceiptItem


class Entry(NamedTuple):
    """An item in a user's queue, with its sequence number."""

    seq: int
    item: Item


@attrs.frozen(slots=True)
class Accepted:
    """The outcome of submitting a message.

    ``entry`` is the new queue entry, or None when the id had been used before
    (``duplicate``), in which case ``ts`` is the original message's timestamp.
    """

    ts: int
    duplicate: bool
    entry: Entry | None


class IdConflict(Exception):
    """A sender re-used a message id for a different recipient."""


class StoreUnavailable(Exception):
    """The store cannot make a change durable as it promises; nothing was acknowledged."""


class Store(Protocol):
    """The interface of the persistence actor.

    Every method that changes state returns only once the change is as durable as the
    store promises (memory: immediately; the durable store: fsync'd on both replicas), and
    raises :class:`StoreUnavailable` when it cannot be.
    """

    #: Whether submit and acknowledge wait for I/O (the durable store's fsync). A session
    #: holding back deliveries to write them together sends them before each message then.
    waits_for_io: bool

    async def run(self, *, task_status: trio.TaskStatus[Store] = ...) -> None:
        """Serve as a supervised child: start, call ``task_status.started(self)``, run."""

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` for ``message.to`` unless its id was already used.

        Raises:
            IdConflict: The sender used this id for another recipient.
        """

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries of ``user`` with ``seq > after``, in order."""

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge ``user``'s items up to ``upto`` and queue the receipts that follow.

        ``delivered`` removes every queued item with ``seq <= upto``. ``read`` does the
        same, then marks read the delivered messages with ``seq <= upto`` (only those from
        ``peer`` when given). The acknowledgement and its receipts are one change.

        Returns:
            The receipt entries queued, each with the user (a sender) it is queued for.
        """

    async def last_seq(self, user: str) -> int:
        """The highest sequence number given to an item of ``user`` (0 if none)."""


class ReplicaStore(Store, Protocol):
    """A node's own store as the cluster uses it: one replica of other users' queues.

    In a cluster, each user's queue lives on two nodes (:mod:`chatd.cluster.replicas`). The
    node that leads a user's queue numbers its items and writes them to both replicas with
    :meth:`put`; merges after a membership change set a queue anew with :meth:`replace`.
    The synchronous reads (sequence numbers, message ids, exports) go to ``index``.
    """

    index: QueueIndex

    async def put(self, user: str, entries: Sequence[Entry]) -> None:
        """Store ``entries`` of ``user``'s queue at their sequence numbers.

        An entry whose seq is acknowledged or already taken is skipped, so replicating the
        same entry twice changes nothing.
        """

    async def acknowledge_only(self, user: str, status: str, upto: int, peer: str | None
                               ) -> list[tuple[str, ReceiptItem]]:
        """Apply an acknowledgement as :meth:`Store.acknowledge` does, but queue nothing.

        Returns:
            The receipts it produces, by sender, for the caller to queue where the senders'
            queues live.
        """

    async def replace(self, states: Mapping[str, UserState]) -> None:
        """Make each user's queue exactly the given state, durably and as one change."""
