"""When to ping a quiet client and when to give up on it (docs/protocol.md 2.6).

:class:`Keepalive` is sans-IO: it is given the time and the last sign of life, and says
what to do and when to look again. It never needs telling of a frame or a pong, so a
connection costs one look per ``ping_interval`` whatever it does.

:class:`KeepaliveWheel` does the looking for every connection of a node, from one task: a
connection is filed under the moment its keepalive is due, rounded up to
:data:`RESOLUTION`, and the wheel sleeps until the earliest. A quiet connection therefore
has no timer, cancel scope or task wake-up of its own while it waits: with thousands of
idle connections, one per connection would expire hundreds of times a second, and each
expiry's objects live a whole ``ping_interval`` (so the garbage collector promotes them
and soon runs full collections over every session).
"""

from __future__ import annotations

import enum
import heapq
import math
from typing import Protocol

import trio

__all__ = ["RESOLUTION", "Keepalive", "KeepaliveAction", "KeepaliveWheel", "Ticking"]

#: Seconds the wheel rounds due times up to: a ping or an idle close comes at most this late.
RESOLUTION = 0.25

#: How early, as a fraction of ``ping_interval``, a ping may go out (see :class:`Keepalive`).
_SLACK = 0.01


class KeepaliveAction(enum.Enum):
    """What :meth:`Keepalive.check` asks the writer to do."""

    WAIT = "wait"
    PING = "ping"
    IDLE = "idle"


class Keepalive:
    """The keepalive schedule of one connection.

    A *sign of life* is the accepted ``hello``, a data message from the client or a pong.
    The next ping is due ``ping_interval`` after the last sign of life; after a ping, the
    client has until ``idle_timeout`` after the sign of life it had given then.

    A ping is sent when it is due within ``ping_interval / 100`` (0.2 s by default): the
    pong to the last ping arrives a round trip after it, and without the slack the writer
    would wake ``ping_interval`` after the ping, find the next one due a round trip later,
    and wake again for it. With it, a quiet connection costs one wake-up per ping.

    Args:
        ping_interval: Seconds of silence before a ping.
        idle_timeout: Seconds after the last sign of life before a pinged client is idle.
        heard: The time of the first sign of life (the hello).
    """

    __slots__ = ("_pinged", "deadline", "idle_timeout", "ping_interval")

    def __init__(self, ping_interval: float, idle_timeout: float, heard: float) -> None:
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._pinged: float | None = None
        #: When to call :meth:`check` next.
        self.deadline = heard + ping_interval

    @property
    def pinged(self) -> bool:
        """Whether a ping is out and no sign of life has come since."""
        return self._pinged is not None

    def check(self, now: float, heard: float) -> KeepaliveAction:
        """Decide what to do at ``now``, the last sign of life being at ``heard``.

        Also sets :attr:`deadline`: the earliest time anything could be due, assuming
        a sign of life might come at any moment (it is only looked at then).
        """
        if self._pinged is not None:
            if heard > self._pinged:
                self._pinged = None
            elif now >= self._pinged + self.idle_timeout:
                return KeepaliveAction.IDLE
            else:
                self.deadline = min(self._pinged + self.idle_timeout, now + self.ping_interval)
                return KeepaliveAction.WAIT
        if now >= heard + self.ping_interval * (1 - _SLACK):
            self._pinged = heard
            self.deadline = min(heard + self.idle_timeout, now + self.ping_interval)
            return KeepaliveAction.PING
        self.deadline = heard + self.ping_interval
        return KeepaliveAction.WAIT


class Ticking(Protocol):
    """What the wheel looks after: a connection's keepalive."""

    def tick(self, now: float) -> float | None:
        """Act on the keepalive at ``now``; return when to be ticked next, or None when the
        connection is done with the wheel. Must not raise: a failure is the connection's,
        which it handles by ending itself."""


class KeepaliveWheel:
    """Every connection's keepalive, run from one task (:meth:`run`).

    Args:
        resolution: Seconds due times are rounded up to.
    """

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self._resolution = resolution
        self._slots: dict[int, dict[Ticking, None]] = {}
        self._where: dict[Ticking, int] = {}
        self._due: list[int] = []  # heap of the slots' numbers
        self._sleeping_until = math.inf
        self._nearer = trio.Event()

    def __len__(self) -> int:
        """How many connections are filed."""
        return len(self._where)

    def schedule(self, target: Ticking, when: float) -> None:
        """File ``target`` (once) to be ticked at ``when`` (node clock), or just after."""
        self.remove(target)
        number = math.ceil(when / self._resolution)
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = {}
            heapq.heappush(self._due, number)
            if number * self._resolution < self._sleeping_until:
                self._nearer.set()
        slot[target] = None
        self._where[target] = number

    def remove(self, target: Ticking) -> None:
        """Take ``target`` off the wheel, if it is filed."""
        number = self._where.pop(target, None)
        if number is not None:
            self._slots[number].pop(target, None)

    async def run(self) -> None:
        """Tick every filed connection when it is due, until cancelled."""
        while True:
            self._sleeping_until = self._due[0] * self._resolution if self._due else math.inf
            with trio.move_on_at(self._sleeping_until):
                await self._nearer.wait()
            self._nearer = trio.Event()
            now = trio.current_time()
            while self._due and self._due[0] * self._resolution <= now:
                for target in self._slots.pop(heapq.heappop(self._due)):
                    del self._where[target]
                    again = target.tick(now)
                    if again is not None:
                        self.schedule(target, max(again, now + self._resolution))
