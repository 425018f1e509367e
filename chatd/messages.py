"""Records that actors send to session mailboxes.

They live apart from the session module so that every actor that talks to sessions (the
router, the registry, presence) can build them without importing the session itself.
"""

from __future__ import annotations

import attrs

from chatd.backends import Entry
from chatd.protocol import Frame

__all__ = ["Deliver", "Push", "Resync"]


@attrs.frozen(slots=True)
class Deliver:
    """A queue entry for the session's user was stored; send it if it is next in order.

    ``prev`` is the seq of the item before it in the queue, when the backend says (NATS
    numbers all queues from one sequence, so a queue's numbers have gaps); -1 means
    ``entry.seq - 1``.
    """

    entry: Entry
    prev: int = -1


@attrs.frozen(slots=True)
class Push:
    """Frames to send to the client as they are (presence updates)."""

    frames: tuple[Frame, ...]


@attrs.frozen(slots=True)
class Resync:
    """Entries for the session's user may have been lost on the way (the bus broke): read
    the queue again from the last item sent."""
