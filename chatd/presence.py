"""The presence actor: last seen, online state, and subscriptions to both.

A user is *online* while they have a session whose last activity (any frame received from
the client) is more recent than ``threshold`` seconds; otherwise they are offline and
*last seen* at the time of that activity, or at the end of their last session.

Sessions report activity coalesced: on connect, on disconnect, and at most once every
``threshold / 4`` seconds while frames keep arriving, never once per frame. Reads
(``lookup``) do not queue; they read the actor's tables directly. Writes and subscriptions
go through the mailbox. When a user's state changes the actor pushes a ``presence`` frame
to every session subscribed to them; a subscriber whose mailbox is full is disconnected as
a slow consumer.

State lives in memory and is lost on restart (a user last seen before the restart reads as
never seen until they are active again).

In a cluster, each node tells its peers about its own users' reports (``pr`` link frames:
online with the time of activity, or offline with the time the session ended) and sends
all its online users when a link comes up (``prsync``). So ``lastseen`` and subscriptions
work for a user on any node; the users of a peer that goes down read as offline, last seen
at their last report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from chatd.actors import ActorTable, Address, Mailbox
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.messages import Push
from chatd.protocol import ErrorCode, Presence

__all__ = ["PresenceService"]

logger = logging.getLogger(__name__)


@attrs.frozen
class _Up:
    user: str
    address: Address
    ts: int


@attrs.frozen
class _Down:
    user: str
    address: Address
    ts: int


@attrs.frozen
class _Active:
    user: str
    ts: int


@attrs.frozen
class _Watch:
    address: Address
    users: tuple[str, ...]
    add: bool


@attrs.frozen
class _Remote:
    """A peer's ``pr`` or ``prsync`` frame, or its link going up or down (``frame`` None)."""

    peer: str
    frame: dict[str, Any] | None
    up: bool = True


_Message = _Up | _Down | _Active | _Watch | _Remote

#: Sends a link frame to a peer (a name) or to every peer (None).
Send = Callable[[str | None, dict[str, Any]], None]


class PresenceService:
    """Owns last-seen times, online state and presence subscriptions.

    Args:
        actors: The node's actor table.
        threshold: Seconds of inactivity after which a connected user reads as offline.
        capacity: The presence mailbox's capacity.
    """

    def __init__(self, actors: ActorTable, *, threshold: float = 60.0,
                 capacity: int = 8192) -> None:
        self._actors = actors
        self.threshold = threshold
        self.report_interval = threshold / 4
        self._mailbox: Mailbox[_Message] = actors.open("presence", capacity)
        self._log = EventLog(logger, actors.node, "presence")
        self._sessions: dict[str, Address] = {}
        self._last_active: dict[str, int] = {}
        self._announced: set[str] = set()
        self._watchers: dict[str, set[Address]] = {}
        self._watching: dict[Address, set[str]] = {}
        self._remote: dict[str, str] = {}  # user -> the peer holding their session
        self._send: Send | None = None

    def lookup(self, user: str) -> Presence:
        """The presence of ``user`` now, as a frame."""
        last = self._last_active.get(user)
        return Presence(user, self._is_online(user, now_ms()), last)

    def _is_online(self, user: str, now: int) -> bool:
        last = self._last_active.get(user)
        return ((user in self._sessions or user in self._remote) and last is not None
                and now - last < self.threshold * 1000)

    def attach(self, send: Send) -> None:
        """Join a cluster: tell peers about local users' presence through ``send``."""
        self._send = send

    async def remote(self, peer: str, frame: dict[str, Any]) -> None:
        """A ``pr`` or ``prsync`` frame from ``peer``."""
        await self._mailbox.deliver(_Remote(peer, frame))

    async def peer_up(self, peer: str) -> None:
        """A link to ``peer`` came up: it gets every local online user."""
        await self._mailbox.deliver(_Remote(peer, None, up=True))

    async def peer_down(self, peer: str) -> None:
        """``peer`` is down: its users read as offline."""
        await self._mailbox.deliver(_Remote(peer, None, up=False))

    async def session_up(self, user: str, address: Address) -> None:
        """Report that ``user`` connected with session ``address``."""
        await self._mailbox.deliver(_Up(user, address, now_ms()))

    async def session_down(self, user: str, address: Address) -> None:
        """Report that session ``address`` of ``user`` ended."""
        await self._mailbox.deliver(_Down(user, address, now_ms()))

    def active(self, user: str) -> bool:
        """Report activity of ``user`` without waiting; False if the mailbox is full."""
        return self._mailbox.deliver_nowait(_Active(user, now_ms()))

    async def watch(self, address: Address, users: tuple[str, ...], *, add: bool) -> None:
        """Subscribe (``add``) or unsubscribe session ``address`` to ``users``."""
        await self._mailbox.deliver(_Watch(address, users, add))

    async def run(self, *, task_status: trio.TaskStatus[PresenceService] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """The actor loop: apply reports, and sweep for users gone idle."""
        task_status.started(self)
        next_sweep = trio.current_time() + self.report_interval
        while True:
            with trio.move_on_at(next_sweep):
                message = await self._mailbox.receive()
                self._handle(message)
                continue
            self._sweep()
            next_sweep = trio.current_time() + self.report_interval

    def _handle(self, message: _Message) -> None:
        match message:
            case _Up(user, address, ts):
                self._sessions[user] = address
                self._last_active[user] = ts
                self._announce(user, ts)
                self._tell(user, True, ts)
            case _Down(user, address, ts):
                if self._sessions.get(user) == address:
                    del self._sessions[user]
                    self._last_active[user] = ts
                    self._announce(user, ts)
                    self._tell(user, False, ts)
                for watched in self._watching.pop(address, ()):
                    watchers = self._watchers.get(watched)
                    if watchers is not None:
                        watchers.discard(address)
                        if not watchers:
                            del self._watchers[watched]
            case _Active(user, ts):
                self._last_active[user] = ts
                self._announce(user, ts)
                self._tell(user, True, ts)
            case _Watch(address, users, add):
                self._watch(address, users, add)
            case _Remote(peer, None, up):
                if up and self._send is not None:
                    self._send(peer, {"t": "prsync", "users": [
                        [user, self._last_active[user]] for user in self._sessions]})
                elif not up:
                    self._forget(peer)
            case _Remote(peer, dict() as frame):
                try:
                    self._apply(peer, frame)
                except (KeyError, TypeError, ValueError):
                    self._log.warning("link_frame_refused", peer=peer,
                                      frame=str(frame.get("t")))

    def _tell(self, user: str, online: bool, ts: int) -> None:
        if self._send is not None:
            self._send(None, {"t": "pr", "u": user, "on": online, "ts": ts})

    def _apply(self, peer: str, frame: dict[str, Any]) -> None:
        if frame["t"] == "prsync":
            self._forget(peer, announce=False)
            reports = [(str(user), True, int(ts)) for user, ts in frame["users"]]
        else:
            reports = [(str(frame["u"]), bool(frame["on"]), int(frame["ts"]))]
        for user, online, ts in reports:
            if online:
                self._remote[user] = peer
            elif self._remote.get(user) == peer:
                del self._remote[user]
            self._last_active[user] = max(ts, self._last_active.get(user, ts))
            self._announce(user, now_ms())

    def _forget(self, peer: str, *, announce: bool = True) -> None:
        gone = [user for user, node in self._remote.items() if node == peer]
        for user in gone:
            del self._remote[user]
        if announce:
            now = now_ms()
            for user in gone:
                self._announce(user, now)

    def _watch(self, address: Address, users: tuple[str, ...], add: bool) -> None:
        watching = self._watching.setdefault(address, set())
        for user in users:
            if add:
                watching.add(user)
                self._watchers.setdefault(user, set()).add(address)
            else:
                watching.discard(user)
                watchers = self._watchers.get(user)
                if watchers is not None:
                    watchers.discard(address)
                    if not watchers:
                        del self._watchers[user]
        if not watching:
            del self._watching[address]
        if add:
            self._push(address, tuple(self.lookup(user) for user in users))

    def _announce(self, user: str, now: int) -> None:
        online = self._is_online(user, now)
        if online == (user in self._announced):
            return
        if online:
            self._announced.add(user)
        else:
            self._announced.discard(user)
        frame = (Presence(user, online, self._last_active.get(user)),)
        for address in tuple(self._watchers.get(user, ())):
            self._push(address, frame)

    def _push(self, address: Address, frames: tuple[Presence, ...]) -> None:
        mailbox = self._actors.lookup(address)
        if (mailbox is not None and not mailbox.deliver_nowait(Push(frames))
                and not mailbox.exiting):
            self._log.warning("slow_consumer", session=str(address))
            mailbox.exit(ErrorCode.SLOW_CONSUMER)

    def _sweep(self) -> None:
        now = now_ms()
        for user in tuple(self._announced):
            if not self._is_online(user, now):
                self._announce(user, now)
