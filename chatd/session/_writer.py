"""The outbound half of a session: the only task that writes to the client's socket.

The writer streams the user's backlog from the queue on connect, then sends whatever
arrives in the session's mailbox (messages, receipts, presence, and the reader's own
answers), coalescing everything that is ready into as few WebSocket messages as the limits
allow, and keeps the connection alive with pings when the client is quiet (:mod:`._keepalive`).

Items go out strictly in sequence order. A delivered entry that is not the next one
expected (the writer was busy catching up, or the session opened in between) is not sent
out of order: the writer reads the missing range from the queue instead, so the queue
stays the single source of truth and nothing is skipped.

While the writer waits for its mailbox, deliveries may be written *inline*, in the
delivering task (:meth:`Writer.inline`, installed as the mailbox's ``inline``): a message
routed to an idle session costs no task switch. Whatever goes wrong there is the
recipient's fault alone; the mailbox contains it (:meth:`chatd.actors.Mailbox.wake`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import trio

from chatd.actors import Mailbox
from chatd.backends import Entry, Message, Queues, StoreUnavailable
from chatd.config import Config
from chatd.logs import EventLog
from chatd.messages import Deliver, Push, Resync, offer
from chatd.metrics import Metrics
from chatd.protocol import (
    ErrorCode,
    Frame,
    Msg,
    ProtocolError,
    Receipt,
    ServerConnection,
    Synced,
)
from chatd.transport import ConnectionClosed, WebSocket

from ._keepalive import Keepalive, KeepaliveAction, KeepaliveWheel

__all__ = ["CATCH_UP_BATCH", "CLOSE_TIMEOUT", "TIMED_UNACKED", "UNREADABLE", "Writer"]

#: Entries read from the store per step while streaming a backlog.
CATCH_UP_BATCH = 256
#: Seconds allowed to tell a client why it is being closed.
CLOSE_TIMEOUT = 2.0
#: Why a session closes when its user's queue cannot be read (the backend is unreachable);
#: the client connects again later.
UNREADABLE = "this user's queue cannot be read now; connect again later"
#: Writes of messages not yet acknowledged whose time a session keeps for the
#: acknowledgement latency (hop 3); a client further behind has its oldest ones untimed.
TIMED_UNACKED = 4096


class Writer:
    """Everything a session sends, in order, through one task.

    Args:
        config: The node's configuration (limits, keepalive timers).
        ws: The connection.
        conn: The session's protocol state (its codec speaks the negotiated version).
        queues: Where the user's backlog is read from.
        user: The authenticated user.
        mailbox: The session's mailbox.
        log: The session's event log.
        last_sign: Returns the time of the client's last sign of life (docs/protocol.md
            2.6); the reader keeps it.
        metrics: Where frames sent are counted.
        keepalives: The node's keepalive wheel, which calls :meth:`tick` when a ping or
            the idle timeout may be due.
    """

    __slots__ = ("_behind", "_config", "_conn", "_framed", "_keepalive", "_keepalives",
                 "_last_sign", "_log", "_mailbox", "_metrics", "_queues", "_scope", "_stored",
                 "_unacked", "_user", "_ws", "ending", "fatal", "sent_seq", "writing")

    def __init__(self, config: Config, ws: WebSocket, conn: ServerConnection, queues: Queues,
                 user: str, mailbox: Mailbox[Any], log: EventLog,
                 last_sign: Callable[[], float], metrics: Metrics,
                 keepalives: KeepaliveWheel) -> None:
        self._config = config
        self._metrics = metrics
        self._ws = ws
        self._conn = conn
        self._queues = queues
        self._user = user
        self._mailbox = mailbox
        self._log = log
        self._last_sign = last_sign
        self._keepalives = keepalives
        self._keepalive: Keepalive | None = None
        self._scope = trio.CancelScope()
        self._behind = False
        #: Messages framed and not yet written, and when those delivered live were stored.
        self._framed = 0
        self._stored: list[float] = []
        #: (last seq, written at, messages) of each write of messages not yet acknowledged.
        self._unacked: deque[tuple[int, float, int]] = deque(maxlen=TIMED_UNACKED)
        #: The seq of the last item sent; acknowledgements are bounded by it.
        self.sent_seq = 0
        #: Whether a message is being written and the socket has not taken it all yet.
        self.writing = False
        #: Whether the writer has been told to stop.
        self.ending = False
        #: Why the writer ended the session, if it did (idle, queue unreadable).
        self.fatal: ProtocolError | None = None

    def stop(self) -> None:
        """Stop now, or, if a message is being written, once it is out (``CLOSE_TIMEOUT``)."""
        self.ending = True
        if self.writing:
            self._scope.deadline = min(self._scope.deadline,
                                       trio.current_time() + CLOSE_TIMEOUT)
        else:
            self._scope.cancel()

    def answer(self, frames: list[Frame]) -> None:
        """Send the reader's answers now if nothing waits to be written, else queue them.

        Answers and items are independent streams (docs/protocol.md 4.7), so an answer
        need not wait behind items the writer has not sent yet; but it never overtakes
        bytes already waiting for the socket, and a client that does not read gets its
        answers through the mailbox, whose bound makes it a slow consumer.
        """
        if not frames:
            return
        ws = self._ws
        if ws.unsent or self.writing:
            offer(self._mailbox, Push(tuple(frames)), self._log, user=self._user)
            return
        self.encode(frames)
        if self._ws.unsent:  # the socket is full: wake the writer to wait on it
            self._mailbox.deliver_nowait(Push(()))  # the writer takes over the rest

    async def run(self) -> None:
        """Send the backlog, then whatever the mailbox brings, until stopped or lost."""
        mailbox = self._mailbox
        config = self._config
        keepalive = self._keepalive = Keepalive(config.ping_interval, config.idle_timeout,
                                                self._last_sign())
        self._keepalives.schedule(self, keepalive.deadline)
        with self._scope:
            try:
                await self._catch_up([])
                if self._conn.version >= Synced.SINCE:
                    self.encode([Synced(self.sent_seq)])
                    await self._flush()
                mailbox.inline = self.inline
                while True:
                    message = await mailbox.receive()
                    frames: list[Frame] = []
                    gap = self._take(message, frames) | self._drain(frames) | self._behind
                    self._behind = False
                    if gap:
                        await self._catch_up(frames)
                    else:
                        self.encode(frames)
                        await self._flush()
            except ConnectionClosed:
                pass
            except StoreUnavailable:  # the backend cannot read the queue now
                self.fatal = ProtocolError(ErrorCode.STORE_UNAVAILABLE, UNREADABLE)
            finally:
                self._keepalive = None
                self._keepalives.remove(self)

    def tick(self, now: float) -> float | None:
        """The keepalive wheel's call (:class:`KeepaliveWheel`): ping a quiet client, or end
        the session if a ping went unanswered for ``idle_timeout``.

        The ping is written at once, after whatever waits for the socket; if the socket
        does not take it all, the writer is woken to wait on it. A failure here is the
        session's alone: it ends like a crashed session (``inline_failed``).

        Returns:
            When to tick again, or None once the writer has ended.
        """
        keepalive = self._keepalive
        if keepalive is None:
            return None
        try:
            match keepalive.check(now, self._last_sign()):
                case KeepaliveAction.PING:
                    unsent = self._ws.unsent
                    self._ws.ping()
                    if self._ws.unsent and not unsent and not self.writing:
                        self._mailbox.deliver_nowait(Push(()))  # the writer drains it
                case KeepaliveAction.IDLE:
                    self.fatal = ProtocolError(
                        ErrorCode.IDLE_TIMEOUT,
                        f"no sign of life for {self._config.idle_timeout:g} s")
                    self._scope.cancel()
                    return None
        except Exception as exc:
            self._log.error("inline_failed", error="inline_failed",
                            actor=str(self._mailbox.address), exc_info=True)
            self._mailbox.exit(exc)
            return None
        return keepalive.deadline

    def inline(self) -> bool:
        """Write what was just delivered from the delivering task, if the writer is idle.

        The mailbox calls this instead of waking the writer while the writer waits for
        messages. It declines (and the writer is woken) while the writer is stopping, is
        behind, or has bytes waiting for the socket; after writing, it hands over to the
        writer if the socket did not take everything or an entry was out of order.
        """
        if self.ending or self._behind or self._ws.unsent:
            return False
        frames: list[Frame] = []
        gap = self._drain(frames)
        if frames:
            self.encode(frames)
        if gap or self._ws.unsent:
            self._behind = gap
            self._mailbox.deliver_nowait(Push(()))  # declined above: wakes the writer
        return True

    def _take(self, message: Deliver | Push | Resync, frames: list[Frame]) -> bool:
        """Add a mailbox message's frames to ``frames``; True if an entry was skipped."""
        match message:
            case Deliver(entry, prev, stored):
                if entry.seq > self.sent_seq:
                    # Next in order when nothing can lie between the last sent and it.
                    if (prev if prev >= 0 else entry.seq - 1) > self.sent_seq:
                        return True
                    frames.append(self._frame(entry, stored))
                    self.sent_seq = entry.seq
            case Push(pushed):
                frames.extend(pushed)
            case Resync():
                return True
        return False

    def _drain(self, frames: list[Frame]) -> bool:
        """Take every message already waiting in the mailbox; True if one was skipped."""
        gap = False
        while True:
            try:
                message = self._mailbox.receive_nowait()
            except trio.WouldBlock:
                return gap
            gap |= self._take(message, frames)

    async def _catch_up(self, frames: list[Frame]) -> None:
        """Send ``frames`` and then every stored entry after the last one sent."""
        queues, user = self._queues, self._user
        while True:
            entries = await queues.pending(user, self.sent_seq, CATCH_UP_BATCH)
            if entries:
                self.sent_seq = entries[-1].seq
                frames.extend(self._frame(entry) for entry in entries)
            self._drain(frames)
            if frames:
                self.encode(frames)
                await self._flush()
                frames = []
            if not entries:
                return

    def encode(self, frames: Sequence[Frame]) -> None:
        """Send frames in as few WebSocket messages as the limits allow."""
        limits = self._config.limits
        to_wire = self._conn.codec.to_wire
        send = self._ws.send
        counted = self._metrics.frames_out
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            counted[frame.INDEX] += 1
            data = cbor2.dumps(to_wire(frame))
            if batch and (size + len(data) > limits.max_frame_bytes
                          or len(batch) == limits.max_frames):
                send(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            send(b"".join(batch))
        if self._framed:
            self._written()

    def _frame(self, entry: Entry, stored: float = 0.0) -> Msg | Receipt:
        """The frame of a queue entry; a message's is noted for the latency histograms."""
        item = entry.item
        if isinstance(item, Message):
            self._framed += 1
            if stored:
                self._stored.append(stored)
            return Msg(entry.seq, item.id, item.sender, item.body, item.ts)
        return Receipt(entry.seq, item.status, item.by, list(item.ids), item.ts)

    def _written(self) -> None:
        """Time the messages just written: hop 2 for those delivered live (their store
        time known); hop 3 starts for all of them together, up to ``TIMED_UNACKED`` writes
        (the histogram is updated in place, as :meth:`Histogram.observe` does, to spare a
        call per message)."""
        metrics = self._metrics
        now = metrics.now()
        if self._stored:
            hop = metrics.delivery_latency
            counts, bounds = hop.counts, hop.bounds
            for stored in self._stored:
                counts[bisect_left(bounds, now - stored)] += 1
            hop.total += now * len(self._stored) - sum(self._stored)
            self._stored.clear()
        self._unacked.append((self.sent_seq, now, self._framed))
        self._framed = 0

    def acknowledged(self, upto: int, at: float) -> None:
        """The client acknowledged every item up to ``upto`` in a message read at ``at``:
        observe hop 3 for the messages of each write it covers whole."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= upto:
            _, written, count = unacked.popleft()
            self._metrics.ack_latency.observe_many(at - written, count)

    async def _flush(self) -> None:
        """Wait until the socket has taken everything sent.

        While the socket is slow, a stop does not cancel the writer: it gets
        ``CLOSE_TIMEOUT`` to finish (see :meth:`stop`), so the error frame and the close
        follow whole messages.
        """
        if not self._ws.unsent:
            if self.ending:
                self._scope.cancel()
            return
        self.writing = True
        try:
            await self._ws.drain()
        finally:
            self.writing = False
        if self.ending:
            self._scope.cancel()
            await trio.lowlevel.checkpoint()

