"""Records that actors send to session mailboxes.

They live apart from the session module so that every actor that talks to sessions (the
router, the registry, presence) can build them without importing the session itself.
"""

from __future__ import annotations

from typing import Any

import attrs

from chatd.actors import Mailbox
from chatd.backends import Entry
from chatd.logs import EventLog
from chatd.protocol import ErrorCode, Frame

__all__ = ["Deliver", "Push", "Resync", "offer"]


@attrs.frozen(slots=True)
class Deliver:
    """A queue entry for the session's user was stored; send it if it is next in order.

    ``prev`` is the seq of the item before it in the queue, when the backend says (NATS
    numbers all queues from one sequence, so a queue's numbers have gaps); -1 means
    ``entry.seq - 1``. ``stored`` is when the store had it, on the node's clock (0.0:
    unknown), where the delivery latency (hop 2) starts.
    """

    entry: Entry
    prev: int = -1
    stored: float = 0.0


@attrs.frozen(slots=True)
class Push:
    """Frames to send to the client as they are (presence updates)."""

    frames: tuple[Frame, ...]


@attrs.frozen(slots=True)
class Resync:
    """Entries for the session's user may have been lost on the way (the bus broke): read
    the queue again from the last item sent."""


def offer(mailbox: Mailbox[Any], message: Deliver | Push | Resync, log: EventLog, *,
          wake: bool = True, **context: object) -> bool:
    """Deliver to a session without waiting, or stop it as a slow consumer.

    A session whose mailbox is full reads more slowly than messages arrive for it: it is
    told to exit with ``slow_consumer`` (once; the warning names ``context``) and its user
    catches up from the queue on the next connection (docs/protocol.md 4.9).

    Args:
        mailbox: The session's mailbox.
        message: What to deliver.
        log: Where to log the slow consumer.
        wake: False to leave the session parked (see :meth:`Mailbox.deliver_nowait`).
        context: Fields for the ``slow_consumer`` log event.

    Returns:
        Whether the message was queued.
    """
    if mailbox.deliver_nowait(message, wake=wake):
        return True
    if not mailbox.exiting:
        log.warning("slow_consumer", queued=mailbox.capacity, **context)
        mailbox.exit(ErrorCode.SLOW_CONSUMER)
    return False
