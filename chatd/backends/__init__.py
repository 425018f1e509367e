"""The backend: queues, state, blobs and bus, behind one set of interfaces.

Every actor above the backend (router, sessions, registry, presence) uses only these
interfaces (:mod:`chatd.backends._interfaces`), so a feature is written once and runs on
both engines:

- ``embedded`` (:mod:`chatd.backends.embedded`), the default of ``chatd serve``: one
  process, its queues on two replicated append-only logs (or in memory);
- ``nats`` (:mod:`chatd.backends.nats`): NATS JetStream, for several processes and
  machines; chosen by ``nats`` URLs in the configuration. Its client libraries are an
  install extra (``pip install 'chatd[nats]'``), imported only when it is chosen.
"""

from __future__ import annotations

from chatd.actors import ActorTable
from chatd.config import Config

from ._interfaces import (
    Backend,
    Blobs,
    Bucket,
    BucketSpec,
    Bus,
    PresenceReport,
    Queues,
    Replaced,
    Signal,
    State,
)
from ._records import (
    Accepted,
    BackendUnavailable,
    BlobInfo,
    BlobNotFound,
    Entry,
    IdConflict,
    Item,
    Message,
    ReceiptItem,
    RevisionMismatch,
    StoreUnavailable,
    Versioned,
)

__all__ = [
    "Accepted",
    "Backend",
    "BackendUnavailable",
    "BlobInfo",
    "BlobNotFound",
    "Blobs",
    "Bucket",
    "BucketSpec",
    "Bus",
    "Entry",
    "IdConflict",
    "Item",
    "Message",
    "PresenceReport",
    "Queues",
    "ReceiptItem",
    "Replaced",
    "RevisionMismatch",
    "Signal",
    "State",
    "StoreUnavailable",
    "Versioned",
    "open_backend",
]


def open_backend(config: Config, actors: ActorTable) -> Backend:
    """The engine the configuration asks for: NATS when ``nats`` URLs are set, else
    embedded.

    Raises:
        BackendUnavailable: NATS is asked for but its client libraries are not installed.
    """
    if config.nats:
        try:
            from chatd.backends.nats._backend import NatsBackend
        except ImportError as exc:
            raise BackendUnavailable(
                f"the NATS backend needs its extra: pip install 'chatd[nats]' (from a clone: "
                f"'.[nats]'; {exc.name} "
                "is missing)") from None
        return NatsBackend(config, actors)
    from chatd.backends.embedded import EmbeddedBackend
    return EmbeddedBackend(config, actors)
