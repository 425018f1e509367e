"""The Python client library, on trio.

Connect with a URL and a token; send messages and wait for SENT, read incoming messages,
receipts and presence changes from :meth:`Client.events`, acknowledge what you processed,
and ask for last seen. Delivery from the server is at-least-once; the library hands each
message (by sender and id) to the application once, dropping repeats.

Example::

    async with connect("ws://127.0.0.1:8765", token) as client:
        await client.send("bob", "hello")
        async for event in client.events():
            ...
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from chatd.protocol import (
    Ack,
    ClientConnection,
    Error,
    ErrorCode,
    Frame,
    LastSeenQuery,
    Msg,
    Presence,
    ProtocolError,
    Receipt,
    Send,
    Sent,
    Subscribe,
    Unsubscribe,
    Welcome,
)

__all__ = ["ChatError", "Client", "Closed", "Event", "close_info", "connect", "new_id"]

#: What :meth:`Client.events` yields.
Event = Msg | Receipt | Presence | Sent | Error

_SEEN_MAX = 100_000


class ChatError(Exception):
    """The server refused a request or the connection.

    Attributes:
        code: The protocol error code (``auth_failed``, ``id_conflict``...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class Closed:
    """How the connection ended: close code, reason, and the last error frame if any."""

    code: int | None
    reason: str | None
    error: Error | None = None


class _Waiter:
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: ChatError | None = None

    def resolve(self, value: Any = None, error: ChatError | None = None) -> None:
        self.value, self.error = value, error
        self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Client:
    """A connected, authenticated client. Make one with :func:`connect`."""

    def __init__(self, ws: WebSocketConnection, conn: ClientConnection, welcome: Welcome,
                 queue_size: int) -> None:
        self._ws = ws
        self._conn = conn
        self.welcome = welcome
        self.user = welcome.user
        #: The highest sequence number the application acknowledged; pass it as
        #: ``resume`` when reconnecting.
        self.last_seq = 0
        self.closed: Closed | None = None
        self._last_error: Error | None = None
        self._sends: dict[str, _Waiter] = {}
        self._queries: dict[str, list[_Waiter]] = {}
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._events_in, self._events_out = trio.open_memory_channel[Event](queue_size)

    # -- sending -----------------------------------------------------------------------

    async def send(self, to: str, body: str, *, id: str | None = None) -> Sent:
        """Send a message and wait until the server has accepted it (SENT).

        Args:
            to: The recipient's user id.
            body: The text.
            id: The idempotency key; a fresh one if omitted. Re-sending an id never
                creates a second message.

        Returns:
            The ``sent`` frame (``dup`` is true if the id had been accepted before).

        Raises:
            ChatError: The server refused the message.
            trio_websocket.ConnectionClosed: The connection ended first.
        """
        msg_id = id or new_id()
        waiter = self._sends[msg_id] = _Waiter()
        try:
            await self._write([Send(msg_id, to, body)])
            result: Sent = await waiter.wait()
        finally:
            self._sends.pop(msg_id, None)
        return result

    async def submit(self, messages: Sequence[tuple[str, str, str]]) -> None:
        """Pipeline ``(id, to, body)`` messages without waiting for SENT.

        Their ``sent`` frames (or ``error`` frames with ``ref`` = id) arrive through
        :meth:`events`.
        """
        await self._write([Send(msg_id, to, body) for msg_id, to, body in messages])

    async def ack(self, upto: int) -> None:
        """Acknowledge everything up to sequence ``upto`` as delivered."""
        await self._write([Ack("delivered", upto)])
        self.last_seq = max(self.last_seq, upto)

    async def read(self, upto: int, peer: str | None = None) -> None:
        """Mark messages up to ``upto`` read (only ``peer``'s when given).

        A read acknowledgement also acknowledges delivery of everything up to ``upto``.
        """
        await self._write([Ack("read", upto, peer)])
        self.last_seq = max(self.last_seq, upto)

    async def last_seen(self, user: str) -> Presence:
        """Ask for ``user``'s presence and last-seen time."""
        waiter = _Waiter()
        self._queries.setdefault(user, []).append(waiter)
        await self._write([LastSeenQuery(user)])
        result: Presence = await waiter.wait()
        return result

    async def subscribe(self, users: Sequence[str]) -> None:
        """Watch the presence of ``users``; updates arrive through :meth:`events`."""
        await self._write([Subscribe(list(users))])

    async def unsubscribe(self, users: Sequence[str]) -> None:
        """Stop watching the presence of ``users``."""
        await self._write([Unsubscribe(list(users))])

    async def _write(self, frames: list[Frame]) -> None:
        limits = self._conn.codec.limits
        for start in range(0, len(frames), limits.max_frames):
            await self._ws.send_message(self._conn.send(frames[start:start + limits.max_frames]))

    # -- receiving ---------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Yield incoming messages, receipts, presence updates and pipelined results.

        The iteration ends when the connection closes; :attr:`closed` says how.
        """
        async for event in self._events_out:
            yield event

    async def _read_loop(self, first: list[Frame]) -> None:
        """Dispatch ``first`` (what came with the welcome), then every later message, in
        order: one task, so frames reach the application in the order the server sent them."""
        try:
            for frame in first:
                await self._dispatch(frame)
            while True:
                data = await self._ws.get_message()
                for frame in self._conn.receive(data):
                    await self._dispatch(frame)
        except ConnectionClosed as exc:
            code, text = close_info(exc)
            self.closed = Closed(code, text, self._last_error)
        except ProtocolError as exc:
            self.closed = Closed(None, exc.code.value, self._last_error)
            await self._ws.aclose(4400, exc.code.value)
        finally:
            self._events_in.close()
            failure = ChatError(*self._close_cause())
            for waiter in self._sends.values():
                waiter.resolve(error=failure)
            for waiters in self._queries.values():
                for waiter in waiters:
                    waiter.resolve(error=failure)

    def _close_cause(self) -> tuple[str, str]:
        if self._last_error is not None:
            return self._last_error.code, self._last_error.message
        if self.closed is not None and self.closed.reason:
            return self.closed.reason, "connection closed"
        return "connection_closed", "connection closed"

    async def _dispatch(self, frame: Frame) -> None:
        match frame:
            case Msg(id=msg_id, sender=sender):
                key = (sender, msg_id)
                if key in self._seen:
                    return
                self._seen[key] = None
                if len(self._seen) > _SEEN_MAX:
                    self._seen.popitem(last=False)
                await self._events_in.send(frame)
            case Receipt():
                await self._events_in.send(frame)
            case Sent(id=msg_id) if msg_id in self._sends:
                self._sends[msg_id].resolve(frame)
            case Error(ref=ref) if ref is not None and ref in self._sends:
                self._sends[ref].resolve(error=ChatError(frame.code, frame.message))
            case Presence(user=user) if self._queries.get(user):
                self._queries[user].pop(0).resolve(frame)
                if not self._queries[user]:
                    del self._queries[user]
            case Error():
                if ErrorCode.is_fatal(frame.code):
                    self._last_error = frame
                await self._events_in.send(frame)
            case Sent() | Presence():
                await self._events_in.send(frame)


def close_info(exc: ConnectionClosed) -> tuple[int | None, str | None]:
    """The close code and reason of a closed connection, when known."""
    reason = exc.reason
    return (reason.code, reason.reason) if reason is not None else (None, None)


def new_id() -> str:
    """A fresh message id (a random UUID, hex)."""
    return uuid.uuid4().hex


@asynccontextmanager
async def connect(url: str, token: str, *, resume: int = 0, timeout: float = 10.0,
                  queue_size: int = 1024) -> AsyncIterator[Client]:
    """Connect, authenticate, and yield a :class:`Client`; close on exit.

    Args:
        url: ``ws://host:port`` of a node.
        token: An HS256 JWT for the user.
        resume: The highest sequence number already processed (from a previous
            connection's :attr:`Client.last_seq`); the server treats it as acknowledged.
        timeout: Seconds allowed for connecting and authenticating.
        queue_size: Events buffered before the library stops reading the socket.

    Raises:
        ChatError: The server refused the hello (bad token, unsupported version...).
        trio_websocket.HandshakeError / OSError: The server could not be reached.
    """
    conn = ClientConnection()
    async with open_websocket_url(url, max_message_size=conn.codec.limits.max_frame_bytes,
                                  connect_timeout=timeout) as ws:
        with trio.fail_after(timeout):
            await ws.send_message(conn.hello(token, resume))
            try:
                frames = conn.receive(await ws.get_message())
            except ProtocolError as exc:
                raise ChatError(exc.code.value, exc.message) from None
            except ConnectionClosed as exc:
                raise ChatError(close_info(exc)[1] or ErrorCode.INTERNAL.value,
                                "connection closed during hello") from None
        welcome = frames[0]
        assert isinstance(welcome, Welcome)
        client = Client(ws, conn, welcome, queue_size)
        client.last_seq = resume
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop, frames[1:])
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        await ws.aclose()
        except BaseExceptionGroup as group:
            # The caller's own exception surfaces as itself, not wrapped by our nursery.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
