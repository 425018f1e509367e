"""When to ping a quiet client and when to give up on it (docs/protocol.md 2.6).

Sans-IO: :class:`Keepalive` is given the time and the last sign of life, and says what to
do and when to look again; the session's writer sleeps until then. It never needs waking
for a frame or a pong, so a busy connection costs no timer work and a quiet one wakes its
writer once per ``ping_interval``.
"""

from __future__ import annotations

import enum

__all__ = ["Keepalive", "KeepaliveAction"]

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
