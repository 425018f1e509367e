"""The registry actor: which session serves which user.

Writes go through the registry's mailbox, one at a time, so a login that takes over an
existing session is decided in one place: the new session is recorded and the old one gets
an exit signal (``session_replaced``). Reads do not queue: the router looks users up in
:attr:`Registry.table` directly, as Erlang code reads an ETS table, so routing a message
costs a dict lookup and no message hop.

The table belongs to the :class:`Registry` object, not to the actor's task, so it survives
a crash and restart of the actor loop.

In a cluster, the table also holds the sessions of other nodes, so that finding a user's
node costs no network round trip. Each node tells its peers about its own sessions as they
come and go (``reg`` / ``unreg`` link frames) and sends all of them when a link comes up
(``sync``); a peer that goes down takes its sessions with it. A login always takes over on
the node it reaches: the node stamps it later than any login of that user it knows of. When
logins on two nodes cross, the later stamp (then the larger node name) wins on both, and
the node holding the other session tells it to exit with ``session_replaced``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from chatd.actors import ActorTable, Address, Mailbox
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.protocol import ErrorCode

__all__ = ["Registry"]

logger = logging.getLogger(__name__)


@attrs.frozen
class _Register:
    user: str
    address: Address
    done: trio.Event


@attrs.frozen
class _Unregister:
    user: str
    address: Address


@attrs.frozen
class _Remote:
    """A peer's frame about its sessions (``reg``, ``unreg`` or ``sync``)."""

    peer: str
    frame: dict[str, Any]


@attrs.frozen
class _PeerUp:
    peer: str


@attrs.frozen
class _PeerDown:
    peer: str


#: Sends a link frame to a peer (a name) or to every peer (None).
Send = Callable[[str | None, dict[str, Any]], None]


class Registry:
    """Maps each online user to the address of their session.

    Args:
        actors: The node's actor table (to open the mailbox and signal replaced sessions).
        capacity: The registry mailbox's capacity.
    """

    def __init__(self, actors: ActorTable, *, capacity: int = 4096) -> None:
        self._actors = actors
        self._table: dict[str, Address] = {}
        self._since: dict[str, int] = {}  # when each user's session logged in, in ms
        self._mailbox: Mailbox[_Register | _Unregister | _Remote | _PeerUp | _PeerDown] = (
            actors.open("registry", capacity))
        self._send: Send | None = None
        self._log = EventLog(logger, actors.node, "registry")

    @property
    def table(self) -> Mapping[str, Address]:
        """Read-only view of user -> session address, for lookups on the hot path."""
        return self._table

    async def register(self, user: str, address: Address) -> None:
        """Make ``address`` the session of ``user``; returns once recorded.

        A session already registered for ``user`` is told to exit with
        ``session_replaced``.
        """
        done = trio.Event()
        await self._mailbox.deliver(_Register(user, address, done))
        await done.wait()

    async def unregister(self, user: str, address: Address) -> None:
        """Forget ``address`` as ``user``'s session, if it still is."""
        await self._mailbox.deliver(_Unregister(user, address))

    def attach(self, send: Send) -> None:
        """Join a cluster: tell peers about local sessions through ``send``."""
        self._send = send

    async def remote(self, peer: str, frame: dict[str, Any]) -> None:
        """A ``reg``, ``unreg`` or ``sync`` frame from ``peer``."""
        await self._mailbox.deliver(_Remote(peer, frame))

    async def peer_up(self, peer: str) -> None:
        """A link to ``peer`` came up: it gets every local session."""
        await self._mailbox.deliver(_PeerUp(peer))

    async def peer_down(self, peer: str) -> None:
        """``peer`` is down: forget its sessions."""
        await self._mailbox.deliver(_PeerDown(peer))

    async def run(self, *, task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The actor loop: apply registrations in arrival order."""
        task_status.started(self)
        while True:
            match await self._mailbox.receive():
                case _Register(user, address, done):
                    # Later than whatever holds the user now, even if the clock stepped
                    # back: on this node the newer login always wins, and the time sent
                    # to peers says so.
                    since = max(now_ms(), self._since.get(user, -1) + 1)
                    self._claim(user, address, since)
                    if self._send is not None:
                        self._send(None, {"t": "reg", "user": user, "serial": address.serial,
                                          "ts": self._since[user]})
                    done.set()
                case _Unregister(user, address):
                    if self._table.get(user) == address:
                        del self._table[user]
                        del self._since[user]
                        if self._send is not None:
                            self._send(None, {"t": "unreg", "user": user,
                                              "serial": address.serial})
                case _PeerUp(peer):
                    if self._send is not None:
                        mine = [[user, address.serial, self._since[user]]
                                for user, address in self._table.items()
                                if address.node == self._actors.node]
                        self._send(peer, {"t": "sync", "sessions": mine})
                case _PeerDown(peer):
                    self._forget(peer)
                case _Remote(peer, frame):
                    try:
                        self._apply(peer, frame)
                    except (KeyError, TypeError, ValueError):
                        self._log.warning("link_frame_refused", peer=peer,
                                          frame=str(frame.get("t")))

    def _claim(self, user: str, address: Address, since: int) -> None:
        """Make ``address`` the user's session unless a later login holds it.

        A replaced local session is told to exit; a replaced remote one is its own node's
        business (it learns of this login from the same broadcast).
        """
        old = self._table.get(user)
        if old is not None and old != address:
            if (self._since[user], old.node) > (since, address.node):
                return
            if old.node == self._actors.node:
                self._actors.exit(old, ErrorCode.SESSION_REPLACED)
            self._log.info("session_replaced", user=user, old=str(old), new=str(address))
        self._table[user] = address
        self._since[user] = since

    def _apply(self, peer: str, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind == "sync":
            self._forget(peer, quiet=True)
            for user, serial, since in frame.get("sessions", []):
                self._claim(str(user), Address(peer, int(serial), f"session:{user}"),
                            int(since))
        elif kind == "reg":
            user = str(frame["user"])
            self._claim(user, Address(peer, int(frame["serial"]), f"session:{user}"),
                        int(frame["ts"]))
        elif kind == "unreg":
            user = str(frame["user"])
            if self._table.get(user) == Address(peer, int(frame["serial"])):
                del self._table[user]
                del self._since[user]

    def _forget(self, peer: str, *, quiet: bool = False) -> None:
        gone = [user for user, address in self._table.items() if address.node == peer]
        for user in gone:
            del self._table[user]
            del self._since[user]
        if gone and not quiet:
            self._log.info("peer_sessions_forgotten", peer=peer, sessions=len(gone))
