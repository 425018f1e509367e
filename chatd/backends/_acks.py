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

import collections
from collections.abc import Sequence

from chatd.protocol import MAX_RECEIPT_IDS

from ._records import ReceiptItem

__all__ = ["Unread", "apply_ack", "plan_receipts"]

#: A user's delivered-but-unread messages: seq -> (sender, id), oldest first.
Unread = collections.OrderedDict[int, tuple[str, str]]


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
        candidates = [(seq, sender, msg_id) for seq, (sender, msg_id) in unread.items()]
        candidates += newly
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
        unread[seq] = (sender, msg_id)
    while len(unread) > max_unread:
        unread.popitem(last=False)
    if status == "read":
        for seq, (sender, _) in list(unread.items()):
            if seq > upto:
                break
            if peer is None or sender == peer:
                del unread[seq]


def _by_sender(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for sender, msg_id in pairs:
        grouped.setdefault(sender, []).append(msg_id)
    return list(grouped.items())
