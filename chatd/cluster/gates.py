"""Per-queue gates on a leader: writes to a queue share it, a merge of it holds it alone.

A leader numbers and writes a queue's items while other writes to the same queue are under
way (each takes its own number first), but a hand-off's merge replaces the whole queue: it
must not interleave with a write. :class:`QueueGates` lets writes in together, makes new
writes wait while a merge holds the queue, and makes the merge wait for the writes already
under way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import trio

__all__ = ["QueueGates"]


class QueueGates:
    """The write and merge gates of the queues one node leads."""

    def __init__(self) -> None:
        self._writers: dict[str, int] = {}
        self._merging: dict[str, trio.Event] = {}
        self._drained: dict[str, trio.Event] = {}
        self._lock = trio.Lock()

    @contextlib.asynccontextmanager
    async def writing(self, user: str) -> AsyncIterator[None]:
        """Hold ``user``'s queue for a write, once no merge holds it."""
        while (merging := self._merging.get(user)) is not None:
            await merging.wait()
        self._writers[user] = self._writers.get(user, 0) + 1
        try:
            yield
        finally:
            count = self._writers.pop(user) - 1
            if count:
                self._writers[user] = count
            elif user in self._drained:
                self._drained[user].set()

    @contextlib.asynccontextmanager
    async def merging(self, users: Sequence[str]) -> AsyncIterator[None]:
        """Hold ``users``' queues alone: new writes wait, and this waits for those under
        way. One merge at a time, so that two never wait for each other."""
        async with self._lock:
            for user in users:
                self._merging[user] = trio.Event()
            try:
                for user in users:
                    if self._writers.get(user):
                        drained = self._drained[user] = trio.Event()
                        await drained.wait()
                        del self._drained[user]
                yield
            finally:
                for user in users:
                    self._merging.pop(user).set()
