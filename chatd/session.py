"""The session actor: one per WebSocket connection, the user's presence on this node.

A session runs in two tasks. The *reader* owns the inbound side: it authenticates the
``hello``, then decodes each client message and acts on its frames (send, ack, presence
queries), answering in one outbound message per inbound one. The *writer* owns the
session's mailbox: it streams the user's backlog from the store on connect, then sends
whatever other actors deliver (messages, receipts, presence), coalescing everything that is
ready into as few WebSocket messages as the limits allow, and keeps the connection alive
with pings when the client is quiet.

The session sends items to the client strictly in sequence order. A delivered entry that is
not the next one expected (the session was busy catching up, or connected in between) is
not sent out of order: the writer reads the missing range from the store instead, so the
store stays the single source of truth and nothing is skipped.

Other actors stop a session with an exit signal on its mailbox (``session_replaced``,
``slow_consumer``, ``shutting_down``); the session then tells the client why in an
``error`` frame and closes with the matching close code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import attrs
import cbor2
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from chatd.actors import ActorTable, Mailbox
from chatd.auth import TokenError, verify_token
from chatd.clock import now_ms
from chatd.config import Config
from chatd.logs import EventLog
from chatd.messages import Deliver, Push
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
from chatd.registry import Registry
from chatd.router import Router
from chatd.store import Entry, Message, Store

__all__ = ["CATCH_UP_BATCH", "Session", "SessionContext"]

logger = logging.getLogger(__name__)

#: Entries read from the store per step while streaming a backlog.
CATCH_UP_BATCH = 256
#: Seconds allowed to tell a client why it is being closed.
CLOSE_TIMEOUT = 2.0

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
    store: Store


class Session:
    """One client connection after the WebSocket handshake.

    Args:
        ctx: The node's services.
        ws: The accepted WebSocket connection.
    """

    __slots__ = ("_auth_scope", "_conn", "_ctx", "_fatal", "_log", "_mailbox", "_reported",
                 "_scope", "_sent_seq", "_stop_reason", "_torn", "_user", "_watching",
                 "_writes", "_ws", "last_heard")

    def __init__(self, ctx: SessionContext, ws: WebSocketConnection) -> None:
        self._ctx = ctx
        self._ws = ws
        self._conn = ServerConnection(ctx.config.limits)
        self._log = EventLog(logger, ctx.actors.node, "session")
        self._user = ""
        self._mailbox: Mailbox[Deliver | Push] | None = None
        self._scope: trio.CancelScope | None = None
        self._auth_scope = trio.CancelScope(
            deadline=trio.current_time() + ctx.config.auth_timeout)
        self._stop_reason: ErrorCode | None = None
        self._writes: set[trio.CancelScope] = set()
        self._torn = False
        self._fatal: ProtocolError | None = None
        self._sent_seq = 0
        self._watching: set[str] = set()
        self._reported = 0.0
        self.last_heard = trio.current_time()

    def stop(self, reason: ErrorCode) -> None:
        """Ask the session to close with ``reason``, whether or not it has authenticated."""
        if self._mailbox is not None:
            self._mailbox.exit(reason)
        elif self._stop_reason is None:
            self._stop_reason = reason
            self._auth_scope.cancel()

    async def run(self) -> None:
        """Serve the connection until either side ends it."""
        try:
            hello, rest = await self._authenticate()
        except ProtocolError as err:
            await self._close(err)
            return
        except ConnectionClosed:
            return
        ctx = self._ctx
        user = self._user
        mailbox = self._mailbox = ctx.actors.open(f"session:{user}",
                                                  ctx.config.mailbox_capacity)
        address = mailbox.address
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                mailbox.bind(scope, self._bound_writes)
                await ctx.registry.register(user, address)
                await ctx.presence.session_up(user, address)
                if hello.resume:
                    await ctx.router.acknowledge(user, "delivered",
                                                 min(hello.resume, ctx.store.last_seq(user)))
                # Everything before the first pending entry reached the user on an earlier
                # connection: acknowledgements up to there are legitimate on this one.
                first = await ctx.store.pending(user, 0, 1)
                self._sent_seq = first[0].seq - 1 if first else ctx.store.last_seq(user)
                await self._send([Welcome(self._conn.version, user,
                                          f"{address.node}.{address.serial}", now_ms(),
                                          ctx.config.limits.max_frame_bytes,
                                          ctx.config.limits.max_string_bytes)])
                self._log.debug("session_opened", user=user, session=str(address))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader(rest)
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            ctx.actors.release(mailbox)
            with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                cleanup.shield = True
                await ctx.registry.unregister(user, address)
                # Presence also drops this session's subscriptions when it learns it ended.
                await ctx.presence.session_down(user, address)
        reason = mailbox.exit_reason
        if isinstance(reason, ErrorCode):
            self._fatal = ProtocolError(reason, _EXIT_MESSAGES.get(reason, reason.value))
        if self._fatal is not None:
            await self._close(self._fatal)

    # -- opening ---------------------------------------------------------------------

    async def _authenticate(self) -> tuple[Hello, list[Frame]]:
        with self._auth_scope:
            data = await self._ws.get_message()
            frames = self._conn.receive(data)
            hello = frames[0]
            assert isinstance(hello, Hello)
            try:
                claims = verify_token(self._ctx.secret, hello.token)
            except TokenError as err:
                raise ProtocolError(ErrorCode(err.code), err.message) from None
            self._user = claims.sub
            self.last_heard = trio.current_time()
            return hello, frames[1:]
        if self._stop_reason is not None:
            raise ProtocolError(self._stop_reason, _EXIT_MESSAGES[self._stop_reason])
        raise ProtocolError(ErrorCode.AUTH_TIMEOUT,
                            f"no valid hello within {self._ctx.config.auth_timeout} s")

    # -- inbound -----------------------------------------------------------------------

    async def _reader(self, frames: list[Frame]) -> None:
        """Act on client frames until the client leaves or breaks the protocol."""
        try:
            await self._handle(frames)
            while True:
                data = await self._ws.get_message()
                self.last_heard = now = trio.current_time()
                if now - self._reported >= self._ctx.presence.report_interval:
                    self._reported = now
                    self._ctx.presence.active(self._user)
                try:
                    frames = self._conn.receive(data)
                except ProtocolError as err:
                    self._fatal = err
                    return
                await self._handle(frames)
        except ConnectionClosed:
            return

    async def _handle(self, frames: Iterable[Frame]) -> None:
        replies: list[Frame] = []
        ctx = self._ctx
        for frame in frames:
            try:
                match frame:
                    case Send():
                        replies.append(await ctx.router.submit(self._user, frame))
                    case Ack(status, upto, peer):
                        await ctx.router.acknowledge(self._user, status,
                                                     min(upto, self._sent_seq), peer)
                    case LastSeenQuery(user):
                        replies.append(ctx.presence.lookup(user))
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
        if replies:
            await self._send(replies)

    async def _subscribe(self, users: Sequence[str]) -> None:
        new = tuple(set(users) - self._watching)
        limit = self._ctx.config.max_subscriptions
        if len(self._watching) + len(new) > limit:
            raise ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                                f"at most {limit} users may be watched per session")
        if new:
            assert self._mailbox is not None
            self._watching.update(new)
            await self._ctx.presence.watch(self._mailbox.address, new, add=True)

    # -- outbound ----------------------------------------------------------------------

    async def _writer(self) -> None:
        assert self._mailbox is not None and self._scope is not None
        mailbox = self._mailbox
        config = self._ctx.config
        try:
            await self._catch_up([])
            while True:
                with trio.move_on_at(self.last_heard + config.ping_interval) as quiet:
                    message = await mailbox.receive()
                if quiet.cancelled_caught:
                    await self._keepalive()
                    continue
                frames: list[Frame] = []
                gap = self._take(message, frames) | self._drain(frames)
                if gap:
                    await self._catch_up(frames)
                elif frames:
                    await self._send(frames)
        except ConnectionClosed:
            self._scope.cancel()

    async def _keepalive(self) -> None:
        """Ping a quiet client; close the session if it shows no life in time."""
        assert self._scope is not None
        deadline = self.last_heard + self._ctx.config.idle_timeout
        with trio.move_on_at(deadline):
            await self._ws.ping()
            self.last_heard = trio.current_time()
            return
        self._fatal = ProtocolError(
            ErrorCode.IDLE_TIMEOUT,
            f"no sign of life for {self._ctx.config.idle_timeout} s")
        self._scope.cancel()

    def _take(self, message: Deliver | Push, frames: list[Frame]) -> bool:
        """Add a mailbox message's frames to ``frames``; True if an entry was skipped."""
        match message:
            case Deliver(entry):
                if entry.seq == self._sent_seq + 1:
                    frames.append(_frame(entry))
                    self._sent_seq = entry.seq
                elif entry.seq > self._sent_seq:
                    return True
            case Push(pushed):
                frames.extend(pushed)
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
        store, user = self._ctx.store, self._user
        while True:
            entries = await store.pending(user, self._sent_seq, CATCH_UP_BATCH)
            if entries:
                self._sent_seq = entries[-1].seq
                frames.extend(_frame(entry) for entry in entries)
            self._drain(frames)
            if frames:
                await self._send(frames)
                frames = []
            if not entries:
                return

    async def _send(self, frames: Sequence[Frame]) -> None:
        """Send frames in as few WebSocket messages as the limits allow."""
        limits = self._ctx.config.limits
        to_wire = self._conn.codec.to_wire
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            data = cbor2.dumps(to_wire(frame))
            if batch and (size + len(data) > limits.max_frame_bytes
                          or len(batch) == limits.max_frames):
                await self._ws.send_message(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            await self._write(b"".join(batch))

    async def _write(self, data: bytes) -> None:
        """Write one WebSocket message so that it is never cut in half.

        An exit signal cancels the session, but a message already being written is given
        up to CLOSE_TIMEOUT to finish, so the close frame that follows lands on a frame
        boundary. A write that still cannot finish leaves the stream torn: the session
        then closes without writing anything more.
        """
        scope = trio.CancelScope(shield=True)
        if self._scope is not None and self._scope.cancel_called:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        self._writes.add(scope)
        try:
            with scope:
                await self._ws.send_message(data)
        finally:
            self._writes.discard(scope)
        if scope.cancelled_caught:
            self._torn = True
            raise ConnectionClosed(None)
        await trio.lowlevel.checkpoint_if_cancelled()

    def _bound_writes(self) -> None:
        """On an exit signal, give writes under way CLOSE_TIMEOUT to finish."""
        deadline = trio.current_time() + CLOSE_TIMEOUT
        for scope in self._writes:
            scope.deadline = min(scope.deadline, deadline)

    async def _close(self, err: ProtocolError) -> None:
        """Tell the client why, then close with the error's close code."""
        close_code = err.close_code or 1011
        if close_code >= 4000 or close_code == 1001:
            self._log.info("session_closed", user=self._user, reason=err.code.value,
                           close_code=int(close_code))
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            try:
                if not self._torn:
                    await self._ws.send_message(self._conn.send([Error(err.code.value,
                                                                       err.message)]))
                await self._ws.aclose(int(close_code), err.code.value)
            except ConnectionClosed:
                pass


def _frame(entry: Entry) -> Msg | Receipt:
    item = entry.item
    if isinstance(item, Message):
        return Msg(entry.seq, item.id, item.sender, item.body, item.ts)
    return Receipt(entry.seq, item.status, item.by, list(item.ids), item.ts)
