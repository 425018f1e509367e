"""The persistence actor's interface and its implementations.

The router and sessions speak only the :class:`Store` interface; the node is built with
one implementation (``Node(store=...)``, the in-memory store by default).
"""

from ._durable import DurableStore
from ._interface import (
    Accepted,
    Entry,
    IdConflict,
    Item,
    Message,
    ReceiptItem,
    Store,
    StoreUnavailable,
)
from ._memory import MemoryStore
from ._segments import ReplicaFailed

__all__ = [
    "Accepted",
    "DurableStore",
    "Entry",
    "IdConflict",
    "Item",
    "MemoryStore",
    "Message",
    "ReceiptItem",
    "ReplicaFailed",
    "Store",
    "StoreUnavailable",
]
