"""Records that actors send to session mailboxes.

They live apart from the session module so that every actor that talks to sessions (the
router, the registry, presence) can build them without importing the session itself.
"""

from __future__ import annotations

import attrs

from chatd.protocol import Frame
from chatd.store import Entry

__all__ = ["Deliver", "Push"]


@attrs.frozen(slots=True)
class Deliver:
    """A queue entry for the session's user was stored; send it if it is next in order."""

    entry: Entry


@attrs.frozen(slots=True)
class Push:
    """Frames to send to the client as they are (presence updates)."""

    frames: tuple[Frame, ...]
