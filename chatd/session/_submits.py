"""A connection's sends, submitted by a task of their own while the reader goes on.

With queues that wait for I/O (the durable store's fsync, a NATS publish), a reader that
submitted each run of sends itself would sit idle while the run is written, and decode the
client's next messages only afterwards. The :class:`SendPipeline` takes runs of sends from
the reader and submits them from its own task: while one write is in flight, the reader
decodes what the client sent next, and the pipeline submits everything that accumulated
meanwhile as one run (one journal batch, one fsync round).

Order holds. Runs are submitted in the order they were read, so their sequence numbers are
taken in that order, and their answers go to the writer in that order. The reader waits
for the pipeline to be empty (:meth:`SendPipeline.drain`) before it acts on any frame
other than a ``send``, so every answer keeps the order of the frames it answers
(docs/protocol.md, section 4.7). At most :data:`MAX_QUEUED` sends wait in the pipeline; the
reader stops reading until there is room.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from chatd.actors import Mailbox
from chatd.protocol import Frame, Send
from chatd.router import Router

__all__ = ["MAX_QUEUED", "SendPipeline"]

#: Most sends read and waiting to be submitted, per connection.
MAX_QUEUED = 4096


class SendPipeline:
    """The runs of sends a connection read and has not submitted yet, and the task that
    submits them.

    Args:
        router: The node's router.
        user: The connection's authenticated user.
        answer: Hands answers to the connection's writer.
        limit: Most sends waiting at once.
    """

    __slots__ = ("_answer", "_drained", "_limit", "_queued", "_router", "_runs", "_user",
                 "_wake")

    def __init__(self, router: Router, user: str, answer: Callable[[list[Frame]], None],
                 limit: int = MAX_QUEUED) -> None:
        self._router = router
        self._user = user
        self._answer = answer
        self._limit = limit
        self._runs: list[tuple[list[Send], float]] = []
        self._queued = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()

    @property
    def idle(self) -> bool:
        """Whether every send handed over was submitted and answered."""
        return self._drained.is_set()

    async def submit(self, run: list[Send], read_at: float) -> None:
        """Hand over a run of sends read at ``read_at`` (node clock); returns at once
        unless :data:`MAX_QUEUED` sends are waiting, then once they were submitted."""
        while self._queued >= self._limit:
            await self.drain()
        self._runs.append((run, read_at))
        self._queued += len(run)
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wake.set()

    async def drain(self) -> None:
        """Wait until every send handed over was submitted and answered."""
        await self._drained.wait()

    async def run(self) -> None:
        """Submit what is handed over, everything waiting as one run, until cancelled."""
        touched: list[Mailbox[Any]] = []
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._runs:
                runs, self._runs, self._queued = self._runs, [], 0
                sends = runs[0][0] if len(runs) == 1 else [
                    send for run, _ in runs for send in run]
                answers: list[Frame] = [*await self._router.submit_many(
                    self._user, sends, touched, runs[0][1])]
                self._answer(answers)
                for mailbox in touched:
                    mailbox.wake()
                touched.clear()
            self._drained.set()
