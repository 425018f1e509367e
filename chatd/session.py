"""The session actor: one per WebSocket connection, the user's presence on this node.

A session runs in two tasks. The *reader* owns the inbound side: it authenticates the
``hello``, then decodes each client message and acts on its frames (send, ack, presence
queries). The *writer* owns the outbound side and is the only task that writes to the
socket: it streams the user's backlog from the store on connect, then sends whatever
arrives in the session's mailbox (messages, receipts, presence, and the reader's own
replies), coalescing everything that is ready into as few WebSocket messages as the
limits allow, and keeps the connection alive with pings when the client is quiet.

The session sends items to the client strictly in sequence order. A delivered entry that is
not the next one expected (the session was busy catching up, or connected in between) is
not sent out of order: the writer reads the missing range from the store instead, so the
store stays the single source of truth and nothing is skipped.

Other actors stop a session with an exit signal on its mailbox (``session_replaced``,
``slow_consumer``, ``shutting_down``). The reader stops at once; the writer stops at once
unless it is in the middle of writing a message, which it is given ``CLOSE_TIMEOUT`` to
finish so that what follows starts on a message boundary. The session then tells the
client why in an ``error`` frame and closes with the matching close code.

At about 660 lines the module holds six jobs; issue 12 splits out the flood budget, the
writer and the merging of acknowledgements.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
import cbor2
import trio

from chatd.actors import ActorTable, Mailbox
from chatd.auth import TokenError, verify_token
from chatd.backends import Entry, Message, Queues, StoreUnavailable
from chatd.clock import now_ms
from chatd.config import Config
from chatd.logs import EventLog
from chatd.messages import Deliver, Push, Resync
from chatd.presence import PresenceService
from chatd.protocol import (
    Ack,
    Error,
    ErrorCode,
    Frame,
    Hello,
    LastSeenQuery,
    Msg,
    ProtocolError,
    Receipt,
    Send,
    ServerConnection,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from chatd.protocol.websocket import WebSocketError
from chatd.registry import Registry
from chatd.router import Router
from chatd.transport import ConnectionClosed, WebSocket

__all__ = ["CATCH_UP_BATCH", "Session", "SessionContext"]

logger = logging.getLogger(__name__)

#: Entries read from the store per step while streaming a backlog.
CATCH_UP_BATCH = 256
#: Seconds allowed to tell a client why it is being closed.
CLOSE_TIMEOUT = 2.0

#: Why a session closes when its user's queue cannot be read (the backend is unreachable);
#: the client connects again later.
_UNREADABLE = "this user's queue cannot be read now; connect again later"

#: Why a presence query or subscription is refused when the backend cannot be read.
_NO_PRESENCE = "presence cannot be read now; try again later"

_EXIT_MESSAGES = {
    ErrorCode.SESSION_REPLACED: "a newer login of this user took over",
    ErrorCode.SLOW_CONSUMER: "messages arrived faster than this connection read them",
    ErrorCode.SHUTTING_DOWN: "the server is shutting down",
}


@attrs.frozen
class SessionContext:
    """The node's services, as a session sees them."""

    config: Config
    secret: bytes
    actors: ActorTable
    registry: Registry
    presence: PresenceService
    router: Router
    queues: Queues


class Session:
    """One client connection after the WebSocket handshake.

    Args:
        ctx: The node's services.
        ws: The accepted WebSocket connection.
    """

    __slots__ = ("_auth_scope", "_behind", "_budget", "_conn", "_ctx", "_ending", "_fatal",
                 "_inbox", "_limited_at", "_log", "_mailbox", "_on_authenticated",
                 "_open_scope", "_reader_scope", "_refilled", "_reported", "_sent_seq",
                 "_stop_reason", "_throttled", "_touched", "_user", "_watching",
                 "_writer_scope", "_writing", "_ws", "_ws_error", "last_heard")

    def __init__(self, ctx: SessionContext, ws: WebSocket, *,
                 on_authenticated: Callable[[], None] | None = None) -> None:
        self._ctx = ctx
        self._ws = ws
        self._on_authenticated = on_authenticated
        self._conn = ServerConnection(ctx.config.limits)
        self._log = EventLog(logger, ctx.actors.node, "session")
        self._user = ""
        self._mailbox: Mailbox[Deliver | Push | Resync] | None = None
        self._auth_scope = trio.CancelScope(
            deadline=trio.current_time() + ctx.config.auth_timeout)
        self._open_scope = trio.CancelScope()
        self._reader_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._stop_reason: ErrorCode | None = None
        self._writing = False
        self._ending = False
        self._fatal: ProtocolError | None = None
        self._ws_error: WebSocketError | None = None
        self._inbox: list[bytes | str] = []
        self._touched: list[Mailbox[Any]] = []
        self._behind = False
        self._sent_seq = 0
        self._watching: set[str] = set()
        self._reported = 0.0
        self.last_heard = trio.current_time()
        self._budget = float(ctx.config.rate_burst)
        self._refilled = self.last_heard
        self._limited_at = -1e9
        self._throttled = False

    @property
    def user(self) -> str:
        """The authenticated user, or "" before the hello is accepted."""
        return self._user

    @property
    def writing(self) -> bool:
        """Whether the writer is in the middle of writing a message."""
        return self._writing

    def stop(self, reason: ErrorCode) -> None:
        """Ask the session to close with ``reason``, whether or not it has authenticated."""
        if self._mailbox is not None:
            self._mailbox.exit(reason)
        elif self._stop_reason is None:
            self._stop_reason = reason
            self._auth_scope.cancel()

    def _on_exit(self) -> None:
        """An exit signal arrived: stop reading and opening now, and stop the writer."""
        self._open_scope.cancel()
        self._reader_scope.cancel()
        self._stop_writer()

    def _stop_writer(self) -> None:
        """Stop the writer now, or, if it is writing, once that message is out."""
        self._ending = True
        if self._writing:
            self._writer_scope.deadline = min(self._writer_scope.deadline,
                                              trio.current_time() + CLOSE_TIMEOUT)
        else:
            self._writer_scope.cancel()

    async def refuse(self, err: ProtocolError) -> None:
        """Close a connection that will not be served, telling the client why."""
        await self._close(err)

    async def run(self) -> None:
        """Serve the connection until either side ends it."""
        try:
            hello, rest = await self._authenticate()
        except ProtocolError as err:
            await self._close(err)
            return
        except WebSocketError as err:
            await self._ws.close(err.code, err.reason, timeout=CLOSE_TIMEOUT)
            return
        except ConnectionClosed:
            return
        ctx = self._ctx
        user = self._user
        mailbox = self._mailbox = ctx.actors.open(f"session:{user}",
                                                  ctx.config.mailbox_capacity)
        address = mailbox.address
        mailbox.bind(None, self._on_exit)
        opened = False
        try:
            with self._open_scope:
                try:
                    await ctx.registry.register(user, address)
                    await ctx.presence.session_up(user, address)
                    await ctx.queues.open(user)
                    opened = True
                    if hello.resume:
                        with contextlib.suppress(ProtocolError):  # store_unavailable: redeliver
                            await ctx.router.acknowledge(user, "delivered", min(
                                hello.resume, await ctx.queues.last_seq(user)))
                    # Everything before the first pending entry reached the user on an
                    # earlier connection: acknowledgements up to there are legitimate.
                    first = await ctx.queues.pending(user, 0, 1)
                    self._sent_seq = (first[0].seq - 1 if first
                                      else await ctx.queues.last_seq(user))
                except StoreUnavailable:
                    self._fatal = ProtocolError(ErrorCode.STORE_UNAVAILABLE, _UNREADABLE)
                    self._open_scope.cancel()
            if not self._open_scope.cancel_called:
                welcome = Welcome(self._conn.version, user, f"{address.node}.{address.serial}",
                                  now_ms(), ctx.config.limits.max_frame_bytes,
                                  ctx.config.limits.max_string_bytes)
                self._log.debug("session_opened", user=user, session=str(address))
                self._encode([welcome])  # first, before any answer the reader may send
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    with self._reader_scope:
                        await self._reader(rest)
                    self._stop_writer()
        finally:
            ctx.actors.release(mailbox)
            if opened:
                ctx.queues.close(user)
            ctx.registry.unregister(user, address)
            with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                cleanup.shield = True
                # Presence also drops this session's subscriptions when it learns it ended.
                await ctx.presence.session_down(user, address)
        reason = mailbox.exit_reason
        if isinstance(reason, ErrorCode):
            self._fatal = ProtocolError(reason, _EXIT_MESSAGES.get(reason, reason.value))
        if self._fatal is not None:
            await self._close(self._fatal)
        elif self._ws_error is not None:
            await self._ws.close(self._ws_error.code, self._ws_error.reason,
                                 timeout=CLOSE_TIMEOUT)
        else:
            await self._ws.close(1000, timeout=CLOSE_TIMEOUT)

    # -- opening ---------------------------------------------------------------------

    async def _authenticate(self) -> tuple[Hello, list[Frame]]:
        with self._auth_scope:
            data = await self._next_message()
            frames = self._conn.receive(data)
            hello = frames[0]
            assert isinstance(hello, Hello)
            try:
                claims = verify_token(self._ctx.secret, hello.token)
            except TokenError as err:
                raise ProtocolError(ErrorCode(err.code), err.message) from None
            self._user = claims.sub
            self.last_heard = trio.current_time()
            if self._on_authenticated is not None:
                self._on_authenticated()
            return hello, frames[1:]
        if self._stop_reason is not None:
            raise ProtocolError(self._stop_reason, _EXIT_MESSAGES[self._stop_reason])
        raise ProtocolError(ErrorCode.AUTH_TIMEOUT,
                            f"no valid hello within {self._ctx.config.auth_timeout} s")

    # -- inbound -----------------------------------------------------------------------

    async def _next_message(self) -> bytes | str:
        if not self._inbox:
            self._inbox = await self._ws.receive()
            self._inbox.reverse()
        return self._inbox.pop()

    async def _reader(self, frames: list[Frame]) -> None:
        """Act on client frames until the client leaves or breaks the protocol."""
        ws = self._ws
        answers: list[Frame] = []
        try:
            await self._throttle(len(frames) + 1, answers)  # the hello and what came with it
            await self._handle(frames, answers)
            self._answer(answers)
            answers = []
            self._wake_touched()
            while True:
                if self._inbox:
                    batch, self._inbox = self._inbox[::-1], []
                else:
                    batch = await ws.receive()
                self.last_heard = now = trio.current_time()
                if now - self._reported >= self._ctx.presence.report_interval:
                    self._reported = now
                    self._ctx.presence.active(self._user)
                # The messages one read brought are acted on together: their answers go
                # out in one write, and so do the items routed to each session.
                # A message the flood budget cannot cover waits (_throttle), and what came
                # before it is acted on first.
                pending: list[Frame] = []
                failed: ProtocolError | None = None
                for data in batch:
                    try:
                        frames = self._conn.receive(data)
                    except ProtocolError as err:
                        failed = err  # the messages before it are still acted on
                        break
                    if pending and self._would_wait(len(frames)):
                        await self._handle(_merge_acks(pending), answers)
                        pending = []
                    await self._throttle(len(frames), answers)
                    pending += frames
                await self._handle(_merge_acks(pending), answers)
                self._answer(answers)
                answers = []
                self._wake_touched()
                if failed is not None:
                    self._fatal = failed
                    return
        except WebSocketError as err:
            self._ws_error = err
        except ConnectionClosed:
            return

    def _would_wait(self, frames: int) -> bool:
        """Whether spending ``frames`` now would make :meth:`_throttle` wait."""
        config = self._ctx.config
        refill = (trio.current_time() - self._refilled) * config.rate_limit
        return min(float(config.rate_burst), self._budget + refill) < frames

    async def _throttle(self, frames: int, answers: list[Frame]) -> None:
        """Spend ``frames`` from the connection's budget, waiting for it if need be.

        Answers collected so far (``answers``) are sent before any wait, and the list is
        emptied.

        The budget holds at most ``rate_burst`` frames and refills at ``rate_limit`` frames
        per second. A message the budget cannot cover is not dropped: the client is told
        ``rate_limited`` (at most once a second) and the session stops reading this
        connection until the budget covers it, so a flood slows only its own sender.
        """
        config = self._ctx.config
        now = trio.current_time()
        self._budget = min(float(config.rate_burst),
                           self._budget + (now - self._refilled) * config.rate_limit)
        self._refilled = now
        self._budget -= frames
        if self._budget >= 0:
            return
        self._answer(answers)
        answers.clear()
        self._wake_touched()
        if now - self._limited_at >= 1.0:
            self._limited_at = now
            self._log.warning("rate_limited", user=self._user)
            self._answer([Error(ErrorCode.RATE_LIMITED.value,
                                f"more than {config.rate_limit:g} frames per second; "
                                "reading paused")])
        # The client is alive (it is the server that is not reading): keepalive waits.
        self._throttled = True
        try:
            await trio.sleep(-self._budget / config.rate_limit)
        finally:
            self._throttled = False
        self.last_heard = trio.current_time()

    async def _handle(self, frames: Iterable[Frame], replies: list[Frame]) -> None:
        """Act on client frames in order, appending their answers to ``replies``.

        If the queues wait for I/O (fsync, NATS), what is ready is sent before each wait:
        the answers so far and the items routed so far. A run of sends is submitted
        together (:meth:`Router.submit_many`): one write for all of them.
        """
        ctx = self._ctx
        flush = ctx.queues.waits_for_io
        frames = list(frames)
        at = 0
        while at < len(frames):
            frame = frames[at]
            at += 1
            if flush and isinstance(frame, Send | Ack):
                self._answer(replies)
                replies.clear()
                self._wake_touched()
            if isinstance(frame, Send):
                run = [frame]
                while at < len(frames) and isinstance(frames[at], Send):
                    run.append(cast(Send, frames[at]))
                    at += 1
                replies.extend(await ctx.router.submit_many(self._user, run, self._touched))
                continue
            try:
                match frame:
                    case Ack(status, upto, peer):
                        await ctx.router.acknowledge(self._user, status,
                                                     min(upto, self._sent_seq), peer,
                                                     self._touched)
                    case LastSeenQuery(user):
                        replies.append(await self._lookup(user))
                    case Subscribe(users):
                        await self._subscribe(users)
                    case Unsubscribe(users):
                        gone = tuple(set(users) & self._watching)
                        self._watching.difference_update(gone)
                        if gone:
                            assert self._mailbox is not None
                            await ctx.presence.watch(self._mailbox.address, gone, add=False)
            except ProtocolError as err:
                replies.append(Error(err.code.value, err.message, err.ref))

    def _wake_touched(self) -> None:
        """Let every session this reader routed items to see them (most write them now)."""
        touched = self._touched
        if touched:
            self._touched = []
            for mailbox in touched:
                mailbox.wake()

    def _answer(self, frames: list[Frame]) -> None:
        """Send answers now if nothing waits to be written, else queue them for the writer.

        Answers and items are independent streams (docs/protocol.md 4.7), so an answer
        need not wait behind items the writer has not sent yet; but it never overtakes
        bytes already waiting for the socket, and a client that does not read gets its
        answers through the mailbox, whose bound makes it a slow consumer.
        """
        if not frames:
            return
        assert self._mailbox is not None
        ws = self._ws
        if ws.unsent or self._writing:
            if not self._mailbox.deliver_nowait(Push(tuple(frames))) and (
                    not self._mailbox.exiting):
                self._log.warning("slow_consumer", user=self._user)
                self._mailbox.exit(ErrorCode.SLOW_CONSUMER)
            return
        self._encode(frames)
        if self._ws.unsent:  # the socket is full: wake the writer to wait on it
            self._mailbox.deliver_nowait(Push(()))  # the writer takes over the rest

    async def _lookup(self, user: str) -> Frame:
        try:
            return await self._ctx.presence.lookup(user)
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, _NO_PRESENCE) from None

    async def _subscribe(self, users: Sequence[str]) -> None:
        new = tuple(set(users) - self._watching)
        limit = self._ctx.config.max_subscriptions
        if len(self._watching) + len(new) > limit:
            raise ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                                f"at most {limit} users may be watched per session")
        if new:
            assert self._mailbox is not None
            try:
                await self._ctx.presence.watch(self._mailbox.address, new, add=True)
            except StoreUnavailable:
                raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, _NO_PRESENCE) from None
            self._watching.update(new)

    # -- outbound ----------------------------------------------------------------------

    async def _writer(self) -> None:
        """Send the backlog, then whatever the mailbox brings."""
        assert self._mailbox is not None
        mailbox = self._mailbox
        ws = self._ws
        config = self._ctx.config
        pinged: float | None = None  # the last sign of life when we pinged
        with self._writer_scope:
            try:
                await self._catch_up([])
                mailbox.inline = self._inline
                while True:
                    heard = max(self.last_heard, ws.pong_at)
                    if pinged is not None and heard > pinged:
                        pinged = None
                    deadline = (heard + config.ping_interval if pinged is None
                                else pinged + config.idle_timeout)
                    with trio.move_on_at(deadline) as quiet:
                        message = await mailbox.receive()
                    if quiet.cancelled_caught:
                        if self._throttled:  # the client waits on us, not the reverse
                            self.last_heard = trio.current_time()
                        elif pinged is None:
                            if trio.current_time() >= heard + config.ping_interval:
                                ws.ping()
                                pinged = heard
                                await self._flush()
                        elif max(self.last_heard, ws.pong_at) <= pinged:
                            self._fatal = ProtocolError(
                                ErrorCode.IDLE_TIMEOUT,
                                f"no sign of life for {config.idle_timeout} s")
                            break
                        continue
                    frames: list[Frame] = []
                    gap = self._take(message, frames) | self._drain(frames) | self._behind
                    self._behind = False
                    if gap:
                        await self._catch_up(frames)
                    else:
                        self._encode(frames)
                        await self._flush()
            except ConnectionClosed:
                pass
            except StoreUnavailable:  # the backend cannot read the queue now
                self._fatal = ProtocolError(ErrorCode.STORE_UNAVAILABLE, _UNREADABLE)
        # The writer is done (connection lost, idle, or told to stop): so is the session.
        self._reader_scope.cancel()

    def _inline(self) -> bool:
        """Write what was just delivered from the delivering task, if the writer is idle.

        The mailbox calls this instead of waking the writer while the writer waits for
        messages. It declines (and the writer is woken) while the writer is stopping, is
        behind, or has bytes waiting for the socket; after writing, it hands over to the
        writer if the socket did not take everything or an entry was out of order.
        """
        if self._ending or self._behind or self._ws.unsent:
            return False
        frames: list[Frame] = []
        gap = self._drain(frames)
        if frames:
            self._encode(frames)
        if gap or self._ws.unsent:
            assert self._mailbox is not None
            self._behind = gap
            self._mailbox.deliver_nowait(Push(()))  # declined above: wakes the writer
        return True

    def _take(self, message: Deliver | Push | Resync, frames: list[Frame]) -> bool:
        """Add a mailbox message's frames to ``frames``; True if an entry was skipped."""
        match message:
            case Deliver(entry, prev):
                if entry.seq > self._sent_seq:
                    # Next in order when nothing can lie between the last sent and it.
                    if (prev if prev >= 0 else entry.seq - 1) > self._sent_seq:
                        return True
                    frames.append(_frame(entry))
                    self._sent_seq = entry.seq
            case Push(pushed):
                frames.extend(pushed)
            case Resync():
                return True
        return False

    def _drain(self, frames: list[Frame]) -> bool:
        """Take every message already waiting in the mailbox; True if one was skipped."""
        assert self._mailbox is not None
        gap = False
        while True:
            try:
                message = self._mailbox.receive_nowait()
            except trio.WouldBlock:
                return gap
            gap |= self._take(message, frames)

    async def _catch_up(self, frames: list[Frame]) -> None:
        """Send ``frames`` and then every stored entry after the last one sent."""
        queues, user = self._ctx.queues, self._user
        while True:
            entries = await queues.pending(user, self._sent_seq, CATCH_UP_BATCH)
            if entries:
                self._sent_seq = entries[-1].seq
                frames.extend(_frame(entry) for entry in entries)
            self._drain(frames)
            if frames:
                self._encode(frames)
                await self._flush()
                frames = []
            if not entries:
                return

    def _encode(self, frames: Sequence[Frame]) -> None:
        """Send frames in as few WebSocket messages as the limits allow."""
        limits = self._ctx.config.limits
        to_wire = self._conn.codec.to_wire
        send = self._ws.send
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            data = cbor2.dumps(to_wire(frame))
            if batch and (size + len(data) > limits.max_frame_bytes
                          or len(batch) == limits.max_frames):
                send(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            send(b"".join(batch))

    async def _flush(self) -> None:
        """Wait until the socket has taken everything sent; only the writer calls this.

        While the socket is slow, an exit signal does not cancel the writer: it gets
        CLOSE_TIMEOUT to finish (see :meth:`_stop_writer`), so the error frame and the
        close follow whole messages.
        """
        if not self._ws.unsent:
            if self._ending:
                self._writer_scope.cancel()
            return
        self._writing = True
        try:
            await self._ws.drain()
        finally:
            self._writing = False
        if self._ending:
            self._writer_scope.cancel()
            await trio.lowlevel.checkpoint()

    async def _close(self, err: ProtocolError) -> None:
        """Tell the client why, then close with the error's close code."""
        close_code = err.close_code or 1011
        if close_code >= 4000 or close_code == 1001:
            self._log.info("session_closed", user=self._user, reason=err.code.value,
                           close_code=int(close_code))
        self._ws.send(self._conn.send([Error(err.code.value, err.message)]))
        await self._ws.close(int(close_code), err.code.value, timeout=CLOSE_TIMEOUT)


def _merge_acks(frames: list[Frame]) -> list[Frame]:
    """Collapse each run of consecutive acknowledgements without ``peer`` into one or two.

    Acknowledgements are cumulative, and ``read`` up to N also acknowledges delivery up to
    N, so a run comes down to its highest ``read`` and, if higher, its highest
    ``delivered``. Each acknowledgement is a store write (an fsync with the durable store),
    so a client that acknowledges every message it gets, and falls behind, catches up in
    one write instead of one per message. Receipts carry the same ids, in fewer frames.
    """
    merged: list[Frame] = []
    run: list[Ack] = []
    for frame in [*frames, None]:
        if isinstance(frame, Ack) and frame.peer is None:
            run.append(frame)
            continue
        if len(run) > 1:
            read = max((ack.upto for ack in run if ack.status == "read"), default=-1)
            delivered = max((ack.upto for ack in run if ack.status == "delivered"), default=-1)
            if read >= 0:
                merged.append(Ack("read", read))
            if delivered > read:
                merged.append(Ack("delivered", delivered))
        else:
            merged.extend(run)
        run = []
        if frame is not None:
            merged.append(frame)
    return merged


def _frame(entry: Entry) -> Msg | Receipt:
    item = entry.item
    if isinstance(item, Message):
        return Msg(entry.seq, item.id, item.sender, item.body, item.ts)
    return Receipt(entry.seq, item.status, item.by, list(item.ids), item.ts)
