"""The registry: which session serves which user, on this node and across the deployment.

A user has one session. Locally, a new login of a user replaces their session on this node
at once: :meth:`Registry.register` records it and tells the old session to exit
(``session_replaced``), in the caller's task and without waiting, so it is decided in one
place. Across processes (the NATS backend), the ``sessions`` state bucket holds each user's
current session as ``[node, serial, since]``: a login claims it with a compare-and-set, and
if it replaced a session of another node, it sends that session a :class:`Replaced` signal
on the bus. Two logins that cross are ordered by the compare-and-set, so the later one
always learns of the earlier one and replaces it.

The router reads :attr:`Registry.local` directly, as Erlang code reads an ETS table, so
delivering a message costs a dict lookup and no message hop. The registry actor releases
claims in the background (:meth:`Registry.unregister`), so a session that ends never waits
for the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs
import cbor2
import trio

from chatd.actors import ActorTable, Address, Mailbox
from chatd.backends import (
    BucketSpec,
    Bus,
    Replaced,
    RevisionMismatch,
    Signal,
    State,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.protocol import ErrorCode

__all__ = ["SESSIONS", "Registry"]

logger = logging.getLogger(__name__)

#: Each user's current session: ``[node, serial, since]`` (CBOR).
SESSIONS = BucketSpec("sessions", durable=False,
                      description="the session of each connected user: node, serial, since")
#: Compare-and-set rounds a login tries before giving up (each loses only to another
#: login of the same user).
_CLAIM_ATTEMPTS = 8


@attrs.frozen
class _Release:
    """Forget ``user``'s claim at ``revision`` unless a newer login holds it."""

    user: str
    revision: int


class Registry:
    """Maps each user with a session on this node to its address, and claims the user's
    session across the deployment.

    Args:
        actors: The node's actor table (to open the mailbox and signal replaced sessions).
        state: Where the ``sessions`` bucket lives.
        bus: Where :class:`Replaced` signals go and come from.
        capacity: The registry mailbox's capacity.
    """

    def __init__(self, actors: ActorTable, state: State, bus: Bus, *,
                 capacity: int = 4096) -> None:
        self._actors = actors
        self._bucket = state.bucket(SESSIONS)
        self._bus = bus
        self._local: dict[str, Address] = {}
        self._claims: dict[Address, int] = {}  # a local session -> its claim's revision
        self._locks: dict[str, trio.Lock] = {}
        self._mailbox: Mailbox[_Release] = actors.open("registry", capacity)
        self._log = EventLog(logger, actors.node, "registry")

    @property
    def local(self) -> Mapping[str, Address]:
        """Read-only view of user -> local session address, for lookups on the hot path."""
        return self._local

    async def register(self, user: str, address: Address) -> None:
        """Make ``address`` the session of ``user`` here and everywhere.

        A session of ``user`` already registered on this node is told to exit with
        ``session_replaced`` at once; one on another node, once the claim is made.

        Raises:
            StoreUnavailable: The claim could not be made (the backend is unreachable);
                ``address`` is registered locally and must be unregistered.
        """
        old = self._local.get(user)
        self._local[user] = address
        if old is not None and old != address:
            self._actors.exit(old, ErrorCode.SESSION_REPLACED)
            self._log.info("session_replaced", user=user, old=str(old), new=str(address))
        await self._bus.join(user)
        lock = self._locks.setdefault(user, trio.Lock())
        try:
            async with lock:
                await self._claim(user, address)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(user, None)

    async def _claim(self, user: str, address: Address) -> None:
        value = cbor2.dumps([address.node, address.serial, now_ms()])
        for _ in range(_CLAIM_ATTEMPTS):
            if self._local.get(user) != address:
                return  # replaced by a newer local login meanwhile: it claims
            current = await self._bucket.get(user)
            try:
                if current is None:
                    revision = await self._bucket.create(user, value)
                else:
                    revision = await self._bucket.update(user, value, current.revision)
            except RevisionMismatch:
                continue
            self._claims[address] = revision
            if current is not None:
                node, serial, _ = cbor2.loads(current.value)
                if node != address.node:
                    self._bus.signal(user, Replaced(node, serial))
                    self._log.info("session_replaced", user=user, old=f"{node}#{serial}",
                                   new=str(address))
            return
        raise StoreUnavailable(f"the session of {user} could not be claimed")

    def unregister(self, user: str, address: Address) -> None:
        """Forget ``address`` as ``user``'s session, if it still is; never waits."""
        if self._local.get(user) == address:
            del self._local[user]
        self._bus.leave(user)
        revision = self._claims.pop(address, None)
        if revision is not None and not self._mailbox.deliver_nowait(_Release(user, revision)):
            self._log.warning("claim_kept", user=user, reason="registry mailbox full")

    def signal(self, user: str, signal: Signal) -> None:
        """A signal for ``user``'s session arrived on the bus: act on it if it is here."""
        match signal:
            case Replaced(node, serial):
                address = self._local.get(user)
                if address is not None and (address.node, address.serial) == (node, serial):
                    del self._local[user]
                    self._actors.exit(address, ErrorCode.SESSION_REPLACED)

    async def run(self, *, task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The actor loop: release the claims of ended sessions, one at a time."""
        task_status.started(self)
        while True:
            release = await self._mailbox.receive()
            try:
                await self._bucket.delete(release.user, revision=release.revision)
            except RevisionMismatch:
                pass  # a newer login holds it
            except StoreUnavailable:
                # The claim stays until the user's next login overwrites it; an old claim
                # only makes that login signal a session that is gone.
                self._log.warning("claim_kept", user=release.user,
                                  reason="backend unavailable")
