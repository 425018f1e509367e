"""The persistence actor's interface and its implementations.

The router and sessions speak only the :class:`Store` interface; the node is built with
one implementation: :class:`DurableStore` (two replicated logs, the default) or
:class:`MemoryStore`, as ``config.store`` says, or any given as ``Node(store=...)``.
"""

from ._durable import DurableStore
from ._index import UserState
from ._interface import (
    Accepted,
    Entry,
    IdConflict,
    Item,
    Message,
    ReceiptItem,
    ReplicaStore,
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
    "ReplicaStore",
    "Store",
    "StoreUnavailable",
    "UserState",
]
