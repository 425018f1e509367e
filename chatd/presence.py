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
"""

from __future__ import annotations

import logging

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
        self._mailbox: Mailbox[_Up | _Down | _Active | _Watch] = actors.open("presence",
                                                                             capacity)
        self._log = EventLog(logger, actors.node, "presence")
        self._sessions: dict[str, Address] = {}
        self._last_active: dict[str, int] = {}
        self._announced: set[str] = set()
        self._watchers: dict[str, set[Address]] = {}
        self._watching: dict[Address, set[str]] = {}

    def lookup(self, user: str) -> Presence:
        """The presence of ``user`` now, as a frame."""
        last = self._last_active.get(user)
        return Presence(user, self._is_online(user, now_ms()), last)

    def _is_online(self, user: str, now: int) -> bool:
        last = self._last_active.get(user)
        return (user in self._sessions and last is not None
                and now - last < self.threshold * 1000)

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

    def _handle(self, message: _Up | _Down | _Active | _Watch) -> None:
        match message:
            case _Up(user, address, ts):
                self._sessions[user] = address
                self._last_active[user] = ts
                self._announce(user, ts)
            case _Down(user, address, ts):
                if self._sessions.get(user) == address:
                    del self._sessions[user]
                    self._last_active[user] = ts
                    self._announce(user, ts)
                for watched in self._watching.pop(address, ()):
                    watchers = self._watchers.get(watched)
                    if watchers is not None:
                        watchers.discard(address)
                        if not watchers:
                            del self._watchers[watched]
            case _Active(user, ts):
                self._last_active[user] = ts
                self._announce(user, ts)
            case _Watch(address, users, add):
                self._watch(address, users, add)

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
