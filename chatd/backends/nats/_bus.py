"""The bus on NATS: core subjects, one per user with a session, one per watched user.

A node holding a session subscribes to ``NS.d.USER``: the queue stream republishes every
item stored for USER there (with ``Nats-Sequence``, ``Nats-Last-Sequence``, the item
before it in the queue, and ``Nats-Time-Stamp``, when it was stored), so an item reaches
the node holding the session without a lookup of where that is. Signals for the session
(a takeover) travel on the same subject, as plain messages. A node watching a user's
presence subscribes to ``NS.p.USER``. Core NATS delivers at most once: the queues are the
record, and after the connection comes back every session reads its queue again (the
``lost`` handler).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import cbor2
import trio

from chatd.backends._interfaces import PresenceReport, Replaced, Signal
from chatd.backends._records import Entry
from chatd.logs import EventLog

from ._bridge import NatsBridge, Reply, Subscribed
from ._names import Names, decode_item

__all__ = ["NatsBus"]


class _Subscriptions:
    """Subscriptions counted by user: made by the first of a user's holders, ended with
    the last."""

    def __init__(self, bridge: NatsBridge) -> None:
        self._bridge = bridge
        self._held: dict[str, tuple[int, Subscribed]] = {}

    def add(self, user: str, subject: str, handler: Callable[[Reply], None]) -> None:
        """One more holder of ``user``'s subscription (made now if it is the first).

        Raises:
            StoreUnavailable: The connection is down (nothing was counted).
        """
        count, subscribed = self._held.get(user, (0, None))
        if subscribed is None:
            subscribed = self._bridge.subscribe(subject, handler)
        self._held[user] = (count + 1, subscribed)

    def remove(self, user: str) -> None:
        """One holder fewer; the subscription ends with the last."""
        count, subscribed = self._held.get(user, (0, None))
        if subscribed is None:
            return
        if count > 1:
            self._held[user] = (count - 1, subscribed)
        else:
            del self._held[user]
            self._bridge.unsubscribe(subscribed)


def _unbound(*args: Any) -> None:
    raise RuntimeError("the bus is used before the node bound its handlers")


class NatsBus:
    """The bus over core NATS (see :class:`chatd.backends.Bus`).

    Args:
        bridge: The node's NATS connection.
        names: Subjects.
        log: Where undecodable traffic is logged.
        note: Told of every entry that arrives, before the node is (the queues remember
            what the session was sent, to acknowledge it without a read).
    """

    def __init__(self, bridge: NatsBridge, names: Names, log: EventLog,
                 note: Callable[[str, Entry, int], None]) -> None:
        self._bridge = bridge
        self._note = note
        self._names = names
        self._log = log
        self._joined = _Subscriptions(bridge)
        self._watched = _Subscriptions(bridge)
        self._deliver: Callable[[str, Entry, int, list[Any] | None, float], None] = _unbound
        self._signal: Callable[[str, Signal], None] = _unbound
        self._presence: Callable[[str, PresenceReport], None] = _unbound
        #: What to do once live traffic may have been lost (the node's handler).
        self.lost: Callable[[], None] = _unbound

    def bind(self, *, deliver: Callable[[str, Entry, int, list[Any] | None, float], None],
             signal: Callable[[str, Signal], None],
             presence: Callable[[str, PresenceReport], None],
             lost: Callable[[], None]) -> None:
        """Take the node's handlers; the backend calls ``lost`` once the connection came
        back and the streams are ready again."""
        self._deliver = deliver
        self._signal = signal
        self._presence = presence
        self.lost = lost

    async def join(self, user: str) -> None:
        """Subscribe to ``user``'s live subject (once per user on this node)."""
        self._joined.add(user, self._names.deliver(user), self._on_live(user))

    def leave(self, user: str) -> None:
        """Drop the subscription once no local session of ``user`` is left."""
        self._joined.remove(user)

    def offer(self, user: str, entry: Entry, touched: list[Any] | None = None,
              stored: float = 0.0) -> None:
        """Nothing to do: the stream republishes every stored item to its user's subject."""

    def signal(self, user: str, signal: Signal) -> None:
        """Publish ``signal`` on ``user``'s live subject."""
        match signal:
            case Replaced(node, serial):
                self._bridge.publish(self._names.deliver(user),
                                     cbor2.dumps(["replaced", node, serial]))

    async def watch(self, user: str) -> None:
        """Subscribe to ``user``'s presence subject (once per user on this node)."""
        self._watched.add(user, self._names.presence(user), self._on_presence(user))

    def unwatch(self, user: str) -> None:
        """Drop the presence subscription once no local session watches ``user``."""
        self._watched.remove(user)

    def report(self, user: str, report: PresenceReport) -> None:
        """Publish ``report`` on ``user``'s presence subject (quietly lost while NATS is
        away: the next report, at most ``online_threshold / 4`` later, corrects it)."""
        if self._bridge.connected:
            self._bridge.publish(self._names.presence(user),
                                 cbor2.dumps([report.online, report.ts, report.session]))

    def _on_live(self, user: str) -> Callable[[Reply], None]:
        def on_live(reply: Reply) -> None:
            headers = reply.headers
            sequence = headers.get("Nats-Sequence")
            if sequence is not None:
                entry = Entry(int(sequence), decode_item(user, reply.data))
                prev = int(headers.get("Nats-Last-Sequence", "0"))
                self._note(user, entry, prev)
                self._deliver(user, entry, prev, None, _stored(headers.get("Nats-Time-Stamp")))
                return
            match cbor2.loads(reply.data):
                case ["replaced", str(node), int(serial)]:
                    self._signal(user, Replaced(node, serial))
                case other:
                    self._log.warning("bus_message_refused", user=user, shape=_shape(other))

        return on_live

    def _on_presence(self, user: str) -> Callable[[Reply], None]:
        def on_presence(reply: Reply) -> None:
            match cbor2.loads(reply.data):
                case [bool(online), int(ts), str(session)]:
                    self._presence(user, PresenceReport(online, ts, session))
                case other:
                    self._log.warning("bus_message_refused", user=user, shape=_shape(other))

        return on_presence


def _stored(stamp: str | None) -> float:
    """When the stream stored a republished item (its ``Nats-Time-Stamp``, wall clock), on
    this process's trio clock; 0.0 when the header is missing or unreadable.

    The two clocks are read together, so the result is off only by the difference between
    this machine's wall clock and the NATS server's (none on one machine; what NTP keeps
    between machines otherwise).
    """
    if not stamp:
        return 0.0
    try:
        wall = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0
    return trio.current_time() - (time.time() - wall)


def _shape(value: Any) -> str:
    """What a refused bus message is, without its content (which might be a message body).

    Returns:
        Its CBOR type and length (``list of 3``), and the tag that a list of chatd's own
        starts with when the first item looks like one (``list of 3 tagged 'replaced'``).
    """
    if not isinstance(value, list | dict | str | bytes):
        return type(value).__name__
    shape = f"{type(value).__name__} of {len(value)}"
    if (isinstance(value, list) and value and isinstance(value[0], str)
            and value[0].isidentifier() and len(value[0]) <= 32):
        shape += f" tagged {value[0]!r}"
    return shape
