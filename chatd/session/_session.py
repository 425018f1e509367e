"""The session: opening a connection's session and acting on the client's frames.

A session runs in two tasks. The *reader* (here) owns the inbound side: it authenticates the
``hello``, opens the session (registry, presence, the user's queue), then decodes each
client message and acts on its frames (send, ack, presence queries) within the
connection's flood budget (:mod:`._flood`). The *writer* (:mod:`._writer`) owns the
outbound side and is the only task that writes to the socket.

Other actors stop a session with an exit signal on its mailbox (``session_replaced``,
``slow_consumer``, ``shutting_down``). The reader stops at once; the writer stops at once
unless it is in the middle of writing a message, which it is given ``CLOSE_TIMEOUT`` to
finish so that what follows starts on a message boundary. The session then tells the
client why in an ``error`` frame and closes with the matching close code. An exit whose
reason is an exception (the session failed while another task wrote to it inline, see
:meth:`chatd.actors.Mailbox.wake`) closes like a crashed session: 1011, reason
``internal``, no ``error`` frame.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
import trio

from chatd.actors import ActorTable, Mailbox
from chatd.auth import TokenError, verify_token
from chatd.backends import Queues, StoreUnavailable
from chatd.clock import now_ms
from chatd.config import Config
from chatd.logs import EventLog
from chatd.metrics import Metrics
from chatd.presence import PresenceService
from chatd.protocol import (
    Ack,
    CloseCode,
    Error,
    ErrorCode,
    Frame,
    Hello,
    LastSeenQuery,
    ProtocolError,
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

from ._acks import merge_acks
from ._flood import TokenBucket
from ._keepalive import KeepaliveWheel
from ._submits import SendPipeline
from ._writer import CATCH_UP_BATCH, CLOSE_TIMEOUT, UNREADABLE, Writer

__all__ = ["CATCH_UP_BATCH", "CLOSE_TIMEOUT", "Session", "SessionContext"]

logger = logging.getLogger(__name__)

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
    metrics: Metrics
    #: Every connection's keepalive, run by the listener.
    keepalives: KeepaliveWheel = attrs.field(factory=KeepaliveWheel)


class Session:
    """One client connection after the WebSocket handshake.

    Args:
        ctx: The node's services.
        ws: The accepted WebSocket connection.
    """

    __slots__ = ("_auth_scope", "_budget", "_conn", "_ctx", "_fatal", "_inbox", "_limited_at",
                 "_log", "_mailbox", "_on_authenticated", "_open_scope", "_reader_scope",
                 "_reported", "_sends", "_stop_reason", "_throttled", "_touched", "_user",
                 "_watching", "_writer", "_ws", "_ws_error", "last_heard")

    def __init__(self, ctx: SessionContext, ws: WebSocket, *,
                 on_authenticated: Callable[[], None] | None = None) -> None:
        self._ctx = ctx
        self._ws = ws
        self._on_authenticated = on_authenticated
        self._conn = ServerConnection(ctx.config.limits)
        self._log = EventLog(logger, ctx.actors.node, "session")
        self._user = ""
        self._mailbox: Mailbox[Any] | None = None
        self._auth_scope = trio.CancelScope(
            deadline=trio.current_time() + ctx.config.auth_timeout)
        self._open_scope = trio.CancelScope()
        self._reader_scope = trio.CancelScope()
        self._writer: Writer | None = None
        self._stop_reason: ErrorCode | None = None
        self._fatal: ProtocolError | None = None
        self._ws_error: WebSocketError | None = None
        self._inbox: list[bytes | str] = []
        self._touched: list[Mailbox[Any]] = []
        #: Where sends go when the queues wait for I/O (:mod:`._submits`).
        self._sends: SendPipeline | None = None
        self._watching: set[str] = set()
        self._reported = 0.0
        #: When the reader last heard from the client (hello or data message).
        self.last_heard = trio.current_time()
        self._budget = TokenBucket(ctx.config.rate_limit, ctx.config.rate_burst,
                                   self.last_heard)
        self._limited_at = -1e9
        self._throttled = False

    @property
    def user(self) -> str:
        """The authenticated user, or "" before the hello is accepted."""
        return self._user

    @property
    def writing(self) -> bool:
        """Whether the writer is in the middle of writing a message."""
        return self._writer is not None and self._writer.writing

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
        if self._writer is not None:
            self._writer.stop()

    def _last_sign(self) -> float:
        """The client's last sign of life: a data message, the hello or a pong.

        A client whose reading is paused for its flood budget is waiting on the server,
        not the reverse: it counts as heard from now.
        """
        if self._throttled:
            return trio.current_time()
        return max(self.last_heard, self._ws.pong_at)

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
        writer = self._writer = Writer(ctx.config, self._ws, self._conn, ctx.queues, user,
                                       mailbox, self._log, self._last_sign, ctx.metrics,
                                       ctx.keepalives)
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
                    writer.sent_seq = (first[0].seq - 1 if first
                                       else await ctx.queues.last_seq(user))
                except StoreUnavailable:
                    self._fatal = ProtocolError(ErrorCode.STORE_UNAVAILABLE, UNREADABLE)
                    self._open_scope.cancel()
            if not self._open_scope.cancel_called:
                welcome = Welcome(self._conn.version, user, f"{address.node}.{address.serial}",
                                  now_ms(), ctx.config.limits.max_frame_bytes,
                                  ctx.config.limits.max_string_bytes)
                self._log.debug("session_opened", user=user, session=str(address))
                writer.encode([welcome])  # first, before any answer the reader may send
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, writer)
                    with self._reader_scope:
                        if ctx.queues.waits_for_io:
                            sends = self._sends = SendPipeline(ctx.router, user,
                                                               self._answer_now)
                            async with trio.open_nursery() as submitting:
                                submitting.start_soon(sends.run)
                                await self._reader(rest)
                                await sends.drain()  # what was read is still submitted
                                submitting.cancel_scope.cancel()
                        else:
                            await self._reader(rest)
                    writer.stop()
        finally:
            ctx.actors.release(mailbox)
            # The writer and the send pipeline call back into the session (its last sign
            # of life, its answers): let go of them, so that an ended session is freed
            # with its last reference, not at the collector's next full pass.
            self._writer = self._sends = None
            if opened:
                ctx.queues.close(user)
            ctx.registry.unregister(user, address)
            with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                cleanup.shield = True
                # Presence also drops this session's subscriptions when it learns it ended.
                await ctx.presence.session_down(user, address)
        reason = mailbox.exit_reason
        fatal = self._fatal or writer.fatal
        if isinstance(reason, ErrorCode):
            fatal = ProtocolError(reason, _EXIT_MESSAGES.get(reason, reason.value))
            if reason is ErrorCode.SLOW_CONSUMER:
                ctx.metrics.slow_consumers += 1
        if isinstance(reason, Exception):  # failed in another task: as if it crashed
            await self._ws.close(int(CloseCode.INTERNAL_ERROR), ErrorCode.INTERNAL.value,
                                 timeout=CLOSE_TIMEOUT)
        elif fatal is not None:
            await self._close(fatal)
        elif self._ws_error is not None:
            await self._ws.close(self._ws_error.code, self._ws_error.reason,
                                 timeout=CLOSE_TIMEOUT)
        else:
            await self._ws.close(1000, timeout=CLOSE_TIMEOUT)

    async def _write(self, writer: Writer) -> None:
        """Run the writer; when it is done (lost, idle, told to stop), so is the session."""
        await writer.run()
        self._reader_scope.cancel()

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
            self._ctx.metrics.frames_in[Hello.INDEX] += 1
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
        clock = self._ctx.metrics.now  # trio's clock, read through its own method
        answers: list[Frame] = []
        try:
            # the hello and what came with it
            await self._throttle(len(frames) + 1, answers, self.last_heard)
            await self._handle(frames, answers)
            self._answer_now(answers)
            answers = []
            self._wake_touched()
            while True:
                if self._inbox:
                    batch, self._inbox = self._inbox[::-1], []
                else:
                    batch = await ws.receive()
                self.last_heard = now = clock()
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
                    if pending and self._budget.would_wait(len(frames), now):
                        await self._handle(merge_acks(pending), answers)
                        pending = []
                        now = clock()  # acting on them may have waited
                    now = await self._throttle(len(frames), answers, now)
                    pending += frames
                await self._handle(merge_acks(pending), answers)
                self._answer_now(answers)
                answers = []
                self._wake_touched()
                if failed is not None:
                    self._fatal = failed
                    return
        except WebSocketError as err:
            self._ws_error = err
        except ConnectionClosed:
            return

    async def _throttle(self, frames: int, answers: list[Frame], now: float) -> float:
        """Spend ``frames`` from the connection's budget at ``now`` (when the client
        message was read), waiting for it if need be.

        Answers collected so far (``answers``) are sent before any wait, and the list is
        emptied. Returns the time after: ``now``, or when the wait ended.

        The budget holds at most ``rate_burst`` frames and refills at ``rate_limit`` frames
        per second. A message the budget cannot cover is not dropped: the client is told
        ``rate_limited`` (at most once a second) and the session stops reading this
        connection until the budget covers it, so a flood slows only its own sender.
        """
        config = self._ctx.config
        wait = self._budget.spend(frames, now)
        if not wait:
            return now
        self._answer_now(answers)
        answers.clear()
        self._wake_touched()
        self._ctx.metrics.rate_limited += 1
        if now - self._limited_at >= 1.0:
            self._limited_at = now
            self._log.warning("rate_limited", user=self._user)
            self._ctx.metrics.errors[ErrorCode.RATE_LIMITED.value] += 1
            self._answer_now([Error(ErrorCode.RATE_LIMITED.value,
                                f"more than {config.rate_limit:g} frames per second; "
                                "reading paused")])
        # The client is alive (it is the server that is not reading): keepalive waits.
        self._throttled = True
        try:
            await trio.sleep(wait)
        finally:
            self._throttled = False
        self.last_heard = trio.current_time()
        return self.last_heard

    async def _handle(self, frames: Iterable[Frame], replies: list[Frame]) -> None:
        """Act on client frames in order, appending their answers to ``replies``.

        A run of sends is submitted together (:meth:`Router.submit_many`): one write for
        all of them. If the queues wait for I/O (fsync, NATS), the run goes to the
        connection's :class:`SendPipeline` instead, which submits it while the reader goes
        on; any other frame waits until the pipeline is empty. Before either, what is ready
        is sent: the answers so far and the items routed so far.
        """
        ctx = self._ctx
        flush = ctx.queues.waits_for_io
        counted = ctx.metrics.frames_in
        frames = list(frames)
        at = 0
        while at < len(frames):
            frame = frames[at]
            counted[frame.INDEX] += 1
            at += 1
            if flush and isinstance(frame, Send | Ack):
                self._answer_now(replies)
                replies.clear()
                self._wake_touched()
            if isinstance(frame, Send):
                run = [frame]
                while at < len(frames) and isinstance(frames[at], Send):
                    run.append(cast(Send, frames[at]))
                    counted[Send.INDEX] += 1
                    at += 1
                if self._sends is not None:
                    await self._sends.submit(run, self.last_heard)
                else:
                    replies.extend(await ctx.router.submit_many(self._user, run, self._touched,
                                                                self.last_heard))
                continue
            if self._sends is not None and not self._sends.idle:
                await self._sends.drain()
            try:
                match frame:
                    case Ack(status, upto, peer):
                        assert self._writer is not None
                        upto = min(upto, self._writer.sent_seq)
                        self._writer.acknowledged(upto, self.last_heard)
                        await ctx.router.acknowledge(self._user, status, upto, peer,
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
                ctx.metrics.errors[err.code.value] += 1
                replies.append(Error(err.code.value, err.message, err.ref))

    def _wake_touched(self) -> None:
        """Let every session this reader routed items to see them (most write them now)."""
        touched = self._touched
        if touched:
            self._touched = []
            for mailbox in touched:
                mailbox.wake()

    def _answer_now(self, frames: list[Frame]) -> None:
        """Hand the reader's answers to the writer (see :meth:`Writer.answer`)."""
        assert self._writer is not None
        self._writer.answer(frames)

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

    async def _close(self, err: ProtocolError) -> None:
        """Tell the client why, then close with the error's close code."""
        close_code = err.close_code or 1011
        if close_code >= 4000 or close_code == 1001:
            self._log.info("session_closed", user=self._user, reason=err.code.value,
                           close_code=int(close_code))
        self._ctx.metrics.frames_out[Error.INDEX] += 1
        self._ctx.metrics.errors[err.code.value] += 1
        self._ws.send(self._conn.send([Error(err.code.value, err.message)]))
        await self._ws.close(int(close_code), err.code.value, timeout=CLOSE_TIMEOUT)

