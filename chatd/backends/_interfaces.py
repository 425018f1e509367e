"""The four interfaces every actor above the backend uses, and nothing else.

- :class:`Queues`: each user's queue of messages and receipts, with idempotent appends,
  reads from a sequence number, and acknowledgements that queue their receipts as one
  change.
- :class:`State`: key-value records with revisions, compare-and-set and per-key expiry, in
  named buckets declared up front (:class:`BucketSpec`).
- :class:`Blobs`: named byte streams.
- :class:`Bus`: live traffic to whichever process holds a user's session (stored entries,
  signals such as a takeover) and presence reports to every process that watches a user.

A :class:`Backend` bundles one implementation of each and runs as the ``backend`` child of
the node's supervisor. Two engines implement it: :mod:`chatd.backends.embedded` (one
process, its own replicated files or memory) and :mod:`chatd.backends.nats` (NATS
JetStream, several processes and machines).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from chatd.metrics import Metrics

from ._records import Accepted, BlobInfo, Entry, Message, Versioned

__all__ = [
    "Backend",
    "Blobs",
    "Bucket",
    "BucketSpec",
    "Bus",
    "PresenceReport",
    "Queues",
    "Replaced",
    "Signal",
    "State",
]


class Queues(Protocol):
    """Every user's queue.

    Every method that changes a queue returns only once the change is as durable as the
    engine promises (memory: at once; the durable store: fsync'd on both replicas; NATS:
    acknowledged by a JetStream quorum), and raises
    :class:`~chatd.backends.StoreUnavailable` when it cannot be.
    """

    #: Whether submit and acknowledge wait for I/O. A session holding back deliveries to
    #: write them together sends them before each such wait.
    waits_for_io: bool

    async def open(self, user: str) -> None:
        """A session of ``user`` opens on this process: get ready to serve its queue.

        Paired with :meth:`close`. Acknowledgements of ``user`` only come between the two.

        Raises:
            StoreUnavailable: The queue cannot be read now.
        """

    def close(self, user: str) -> None:
        """The session that called :meth:`open` for ``user`` ended."""

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` for ``message.to`` unless (sender, id) was already used.

        Raises:
            IdConflict: The sender used this id for another recipient.
            StoreUnavailable: Nothing was stored; the sender may try again.
        """

    async def submit_many(self, messages: Sequence[Message]
                          ) -> list[Accepted | Exception]:
        """Submit a run of messages together (one write, one round trip where possible).

        The messages of one sender are queued in the order given.

        Returns:
            For each message, what :meth:`submit` would return, or the exception it would
            raise (:class:`IdConflict`, :class:`StoreUnavailable`).
        """

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries of ``user`` with ``seq > after``, in order.

        Raises:
            StoreUnavailable: The queue cannot be read now.
        """

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge ``user``'s items up to ``upto`` and queue the receipts that follow.

        ``delivered`` removes every queued item with ``seq <= upto``. ``read`` does the
        same, then marks read the delivered messages with ``seq <= upto`` (only those from
        ``peer`` when given). The acknowledgement and its receipts are one change.

        Returns:
            The receipt entries queued, each with the user (a sender) it is queued for.

        Raises:
            StoreUnavailable: Nothing changed; the acknowledgement may be sent again.
        """

    async def last_seq(self, user: str) -> int:
        """The highest sequence number given to an item of ``user`` (0 if none).

        Raises:
            StoreUnavailable: The queue cannot be read now.
        """


@attrs.frozen
class BucketSpec:
    """A bucket of state records, declared before the backend runs.

    Attributes:
        name: The bucket's name (lower-case letters, digits and ``_``).
        durable: Whether records survive a restart of the process (embedded). A bucket
            that is not durable lives in memory on the embedded engine; on NATS every
            bucket is kept on disk, since chatd processes outlive a restart of the servers
            and so must what they keep there.
        description: What the bucket holds, for operators.
    """

    name: str
    durable: bool
    description: str = ""


class Bucket(Protocol):
    """Key-value records with revisions, compare-and-set and per-key expiry.

    Keys are IDENT strings (docs/protocol.md 1.6), values bytes. A revision is a positive
    integer that grows with every write to the bucket. ``ttl`` (seconds) makes a record
    expire that long after it was written; None keeps it until it is overwritten or
    deleted.

    Raises (every method):
        StoreUnavailable: The backend cannot serve the request now.
    """

    spec: BucketSpec

    async def get(self, key: str) -> Versioned | None:
        """The record of ``key``, or None if there is none (or it expired)."""

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` whatever it holds; returns the new revision."""

    async def put_many(self, records: Sequence[tuple[str, bytes]], *,
                       ttl: float | None = None) -> list[int]:
        """Write several keys whatever they hold, in one write where the engine can (one
        journal write; publishes sent at once); their new revisions, in order."""

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` only if it holds nothing.

        Raises:
            RevisionMismatch: It holds a record.
        """

    async def update(self, key: str, value: bytes, revision: int, *,
                     ttl: float | None = None) -> int:
        """Write ``key`` only if its record has ``revision``.

        Raises:
            RevisionMismatch: It holds another revision, or nothing.
        """

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key``; with ``revision``, only if its record has that revision.

        Raises:
            RevisionMismatch: ``revision`` was given and the record has another.
        """


class State(Protocol):
    """Named buckets of state records."""

    def bucket(self, spec: BucketSpec) -> Bucket:
        """The bucket ``spec`` names; every bucket is declared before the backend runs.

        Raises:
            RuntimeError: The backend is already running and the bucket is new.
        """


class Blobs(Protocol):
    """Named byte streams, stored as durably as the engine's queues."""

    async def put(self, name: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Store the bytes ``chunks`` yields under ``name``, replacing any blob there.

        Raises:
            StoreUnavailable: Nothing was stored.
        """

    def get(self, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes, in chunks.

        Raises:
            BlobNotFound: No blob has this name (on the first iteration).
        """

    async def info(self, name: str) -> BlobInfo | None:
        """What is known of the blob, or None if there is none."""

    async def delete(self, name: str) -> bool:
        """Remove the blob; whether there was one."""


@attrs.frozen(slots=True)
class Replaced:
    """A signal: the session ``serial`` on ``node`` was replaced by a newer login."""

    node: str
    serial: int


#: What the bus carries to a session besides its entries.
Signal = Replaced


@attrs.frozen(slots=True)
class PresenceReport:
    """A user's presence as one process saw it: online (with a session) or not, the time
    of their last activity (or of their session's end) in ms, and the session reporting
    (``node.serial``)."""

    online: bool
    ts: int
    session: str


class Bus(Protocol):
    """Live traffic between the processes of a deployment (at most once; the queues are
    the record).

    A process *joins* a user while it holds that user's session; it then receives the
    entries stored for the user and the signals sent to the user's session. A process
    *watches* a user while one of its sessions subscribes to the user's presence; it then
    receives the user's presence reports.
    """

    def bind(self, *, deliver: Callable[[str, Entry, int, list[Any] | None, float], None],
             signal: Callable[[str, Signal], None],
             presence: Callable[[str, PresenceReport], None],
             lost: Callable[[], None]) -> None:
        """Say what to do with what arrives (called once, before the backend runs).

        Args:
            deliver: An entry stored for a joined user: ``(user, entry, prev, touched,
                stored)``, where ``prev`` is the seq of the item before it in the user's
                queue, or -1 when the engine numbers every queue without gaps
                (``entry.seq - 1``), ``touched`` is what :meth:`offer` was given (None from
                another process), and ``stored`` when the entry was stored, on this
                process's trio clock (0.0 when unknown).
            signal: A signal for a joined user's session.
            presence: A report about a watched user.
            lost: Traffic may have been lost (the connection to the bus broke): sessions
                should read their queues again.
        """

    async def join(self, user: str) -> None:
        """Receive ``user``'s entries and signals from now on (paired with :meth:`leave`).

        Raises:
            StoreUnavailable: The bus cannot be reached now.
        """

    def leave(self, user: str) -> None:
        """Stop receiving ``user``'s entries and signals (once every join has left)."""

    def offer(self, user: str, entry: Entry, touched: list[Any] | None = None,
              stored: float = 0.0) -> None:
        """An entry was stored for ``user``: bring it to the process holding their session.

        ``touched`` is the caller's list of sessions offered items without being woken
        (for a local delivery; see :meth:`chatd.router.Router.deliver`); ``stored`` is
        when the store had it, on this process's trio clock (0.0: unknown).
        """

    def signal(self, user: str, signal: Signal) -> None:
        """Send ``signal`` to ``user``'s session, wherever it is."""

    async def watch(self, user: str) -> None:
        """Receive ``user``'s presence reports from now on (paired with :meth:`unwatch`)."""

    def unwatch(self, user: str) -> None:
        """Stop receiving ``user``'s presence reports (once every watch has gone)."""

    def report(self, user: str, report: PresenceReport) -> None:
        """Tell every process watching ``user`` about their presence."""


class Backend(Protocol):
    """One engine's queues, state, blobs and bus, run as one supervised child."""

    #: The engine's name: ``"embedded"`` or ``"nats"``.
    engine: str
    queues: Queues
    state: State
    blobs: Blobs
    bus: Bus

    def export(self, metrics: Metrics) -> None:
        """Add the engine's own figures to the node's metrics (read at each scrape)."""
        ...

    def unready(self) -> tuple[str, str] | None:
        """Why the engine would not accept a write now, or None if it would.

        Returns:
            (check, reason): the check that failed (``store``, ``nats``) and why, in one
            line; None when writes are accepted.
        """
        ...

    async def run(self, *, task_status: trio.TaskStatus[Backend] = ...) -> None:
        """Start the engine, call ``task_status.started(self)`` once it serves, then run.

        Raises:
            BackendUnavailable: The engine cannot start (one line for the operator).
        """
