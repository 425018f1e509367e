"""The records that cross the backend interfaces, and the errors they raise.

A *queue* holds, per user, the items waiting for that user's acknowledgement: messages sent
to them and receipts for messages they sent. Each item has a sequence number that only
grows; items leave the queue when the user acknowledges them as delivered. Messages
acknowledged as delivered but not yet read are remembered (sender and id only), so that a
later read acknowledgement can produce READ receipts. Message ids are remembered for a
window, so that sending the same id twice never creates a second message.

*State* is key-value records with revisions; *blobs* are named byte streams.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs

__all__ = [
    "Accepted",
    "BackendUnavailable",
    "BlobInfo",
    "BlobNotFound",
    "Entry",
    "IdConflict",
    "Item",
    "Message",
    "ReceiptItem",
    "RevisionMismatch",
    "StoreUnavailable",
    "Versioned",
]


# Items are named tuples (cheap to build, immutable); the embedded index keeps them as plain
# tuples, which the garbage collector stops tracking (see embedded/_index.py).


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


class BackendUnavailable(Exception):
    """The backend cannot start: a one-line reason for the operator (exit status 1)."""


class StoreUnavailable(Exception):
    """The backend cannot make a change durable as it promises; nothing was acknowledged."""


@attrs.frozen(slots=True)
class Versioned:
    """A state record: its key, its value and the revision that wrote it."""

    key: str
    value: bytes
    revision: int


class RevisionMismatch(Exception):
    """A compare-and-set found another revision (or a record where none was expected)."""


@attrs.frozen(slots=True)
class BlobInfo:
    """What is known of a stored blob: its name, size in bytes and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str


class BlobNotFound(Exception):
    """No blob has this name."""
