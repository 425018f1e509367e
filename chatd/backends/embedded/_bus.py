"""The embedded engine's bus: one process, so everything is delivered in place.

Every session lives in this process, so an offered entry, a signal and a presence report
go straight to the handlers the node bound (:meth:`LocalBus.bind`), in the caller's task,
without a hop. Joining and watching cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatd.backends._interfaces import PresenceReport, Signal
from chatd.backends._records import Entry

__all__ = ["LocalBus"]


def _unbound(*args: Any) -> None:
    raise RuntimeError("the bus is used before the node bound its handlers")


class LocalBus:
    """The in-process bus (see :class:`chatd.backends.Bus`)."""

    def __init__(self) -> None:
        self._deliver: Callable[[str, Entry, int, list[Any] | None, float], None] = _unbound
        self._signal: Callable[[str, Signal], None] = _unbound
        self._presence: Callable[[str, PresenceReport], None] = _unbound

    def bind(self, *, deliver: Callable[[str, Entry, int, list[Any] | None, float], None],
             signal: Callable[[str, Signal], None],
             presence: Callable[[str, PresenceReport], None],
             lost: Callable[[], None]) -> None:
        """Take the node's handlers (``lost`` never happens in one process)."""
        self._deliver = deliver
        self._signal = signal
        self._presence = presence

    async def join(self, user: str) -> None:
        """Nothing to do: every entry is offered in this process."""

    def leave(self, user: str) -> None:
        """Nothing to undo."""

    def offer(self, user: str, entry: Entry, touched: list[Any] | None = None,
              stored: float = 0.0) -> None:
        """Hand the entry to the local session of ``user``, if any."""
        self._deliver(user, entry, -1, touched, stored)

    def signal(self, user: str, signal: Signal) -> None:
        """Hand the signal to the local session of ``user``, if any."""
        self._signal(user, signal)

    async def watch(self, user: str) -> None:
        """Nothing to do: every report is made in this process."""

    def unwatch(self, user: str) -> None:
        """Nothing to undo."""

    def report(self, user: str, report: PresenceReport) -> None:
        """Hand the report to this process's presence actor."""
        self._presence(user, report)
