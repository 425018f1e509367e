"""What an acknowledgement does to a queue's unread memory, and the receipts it produces.

Sans-IO and shared by both engines, so that they answer the same acknowledgement with the
same receipts (docs/protocol.md 4.4-4.6):

- every message leaving the queue (``newly``) produces a ``delivered`` receipt and joins
  the user's *unread* messages, of which at most ``max_unread`` are remembered, the oldest
  forgotten first;
- a ``read`` acknowledgement up to ``upto`` then marks read the unread messages with
  ``seq <= upto`` (only ``peer``'s when given): each produces a ``read`` receipt and is
  forgotten.

Receipts are grouped by sender, ``delivered`` before ``read``, at most
:data:`~chatd.protocol.MAX_RECEIPT_IDS` ids each, the ids of a sender in sequence order.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence

from chatd.protocol import MAX_RECEIPT_IDS

from ._records import ReceiptItem

__all__ = ["Unread", "apply_ack", "plan_receipts"]


class Unread:
    """A user's delivered-but-unread messages, oldest first: about 20 bytes each plus the
    id's characters, and no object per message.

    Each message is a sequence number in an array, a reference to its sender's one shared
    string, and its id's bytes in one buffer (with where each ends in another array). A
    message read, or forgotten past ``max_unread``, is marked (its sender emptied) and
    left in place; the arrays are rebuilt without the marked ones once those are as many
    as the others, so each message is moved a bounded number of times.

    Args:
        entries: ``(seq, sender, id)`` in seq order.
    """

    __slots__ = ("_dead", "_ends", "_first", "_ids", "_senders", "_seqs")

    def __init__(self, entries: Iterable[tuple[int, str, str]] = ()) -> None:
        self._seqs = array("q")
        self._senders: list[str] = []
        self._ids = bytearray()
        self._ends = array("I")
        self._first = 0  # no unread message before this position
        self._dead = 0
        self._fill(entries)

    def _fill(self, entries: Iterable[tuple[int, str, str]]) -> None:
        for seq, sender, msg_id in entries:
            self.append(seq, sender, msg_id)

    def __len__(self) -> int:
        """How many messages are unread."""
        return len(self._seqs) - self._dead

    def __iter__(self) -> Iterator[tuple[int, str, str]]:
        """Every unread message's ``(seq, sender, id)``, oldest first."""
        seqs, senders, ids, ends = self._seqs, self._senders, self._ids, self._ends
        for at in range(self._first, len(seqs)):
            sender = senders[at]
            if sender:
                yield seqs[at], sender, ids[ends[at - 1] if at else 0:ends[at]].decode()

    def copy(self) -> Unread:
        """A copy to change while this one stays as it is."""
        return Unread(self)

    def append(self, seq: int, sender: str, msg_id: str) -> None:
        """Add a message, newer than every one held."""
        self._seqs.append(seq)
        self._senders.append(sys.intern(sender))
        self._ids += msg_id.encode()
        self._ends.append(len(self._ids))

    def trim(self, most: int) -> None:
        """Forget the oldest messages beyond ``most``."""
        senders, at = self._senders, self._first
        while len(self) > most:
            if senders[at]:
                self._drop(at)
            at += 1
        self._settle()

    def mark_read(self, upto: int, peer: str | None) -> None:
        """Forget the messages with ``seq <= upto`` (only ``peer``'s, when given)."""
        seqs, senders = self._seqs, self._senders
        for at in range(self._first, len(seqs)):
            if seqs[at] > upto:
                break
            if senders[at] and (peer is None or senders[at] == peer):
                self._drop(at)
        self._settle()

    def _drop(self, at: int) -> None:
        self._senders[at] = ""
        self._dead += 1

    def _settle(self) -> None:
        """Skip the marked messages at the front; rebuild once half are marked."""
        senders, at = self._senders, self._first
        while at < len(senders) and not senders[at]:
            at += 1
        self._first = at
        if self._dead > 32 and self._dead * 2 >= len(senders):
            unread = list(self)
            self._seqs, self._senders = array("q"), []
            self._ids, self._ends = bytearray(), array("I")
            self._first = self._dead = 0
            self._fill(unread)


def plan_receipts(user: str, status: str, upto: int, peer: str | None, ts: int,
                  newly: Sequence[tuple[int, str, str]], unread: Unread, max_unread: int
                  ) -> tuple[tuple[str, ReceiptItem], ...]:
    """The receipts an acknowledgement produces, without changing anything.

    Args:
        user: Who acknowledges.
        status: ``delivered`` or ``read``.
        upto: The acknowledged sequence number.
        peer: For ``read``, only this sender's messages are marked read.
        ts: The receipts' timestamp.
        newly: The messages leaving the queue, ``(seq, sender, id)`` in seq order.
        unread: The user's unread messages before the acknowledgement.
        max_unread: Most unread messages remembered.

    Returns:
        ``(sender, receipt)`` pairs in the order they are queued.
    """
    delivered = [(sender, msg_id) for _, sender, msg_id in newly]
    read: list[tuple[str, str]] = []
    if status == "read":
        candidates = [*unread, *newly]
        kept = candidates[max(0, len(candidates) - max_unread):]
        read = [(sender, msg_id) for seq, sender, msg_id in kept
                if seq <= upto and (peer is None or sender == peer)]
    return tuple(
        (sender, ReceiptItem(state, user, tuple(ids[i:i + MAX_RECEIPT_IDS]), ts))
        for state, pairs in (("delivered", delivered), ("read", read))
        for sender, ids in _by_sender(pairs)
        for i in range(0, len(ids), MAX_RECEIPT_IDS)
    )


def apply_ack(status: str, upto: int, peer: str | None,
              newly: Sequence[tuple[int, str, str]], unread: Unread, max_unread: int) -> None:
    """Change ``unread`` as the acknowledgement :func:`plan_receipts` planned does."""
    for seq, sender, msg_id in newly:
        unread.append(seq, sender, msg_id)
    unread.trim(max_unread)
    if status == "read":
        unread.mark_read(upto, peer)


def _by_sender(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for sender, msg_id in pairs:
        grouped.setdefault(sender, []).append(msg_id)
    return list(grouped.items())
