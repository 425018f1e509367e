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

The module is about 650 lines, on purpose: the connection, the failover that outlives it
and the state they share (outbox, resume point, subscriptions, the backlog's end) stay
together, since each reconnection touches all of them. Opening a
connection (TCP, TLS, the WebSocket handshake, and the cause of a failure) is
:mod:`chatd.dial`'s.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from chatd.dial import ConnectFailed, client_context, open_websocket, parse_url
from chatd.protocol import (
    Ack,
    ClientConnection,
    CloseCode,
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
    Synced,
    Unsubscribe,
    Welcome,
)

__all__ = ["Backoff", "ChatError", "Client", "Closed", "ConnectFailed", "Event", "Failure",
           "close_info", "connect", "new_id"]

#: What :meth:`Client.events` yields.
Event = Msg | Receipt | Presence | Sent | Error

_SEEN_MAX = 100_000

logger = logging.getLogger(__name__)


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


@attrs.frozen
class Failure:
    """An attempt to connect that failed, or a connection that was lost.

    Attributes:
        url: The node's URL.
        cause: Why, in words: ``Connection refused``, ``TLS: ...``, ``refused:
            shutting_down: ...`` (a refused hello), or for a lost connection the error
            code that announced the close (``shutting_down: the server is shutting down``)
            or its close code.
        lost: True if the connection had been up (it was lost), False if it never was.
    """

    url: str
    cause: str
    lost: bool = False

    def __str__(self) -> str:
        return f"{'connection lost' if self.lost else 'cannot connect'}: {self.url}: {self.cause}"


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


@attrs.frozen
class Backoff:
    """Jittered exponential backoff between connection attempts.

    Attempt ``n`` (from 0) waits a uniformly random time between 0 and
    ``min(maximum, initial * 2**n)`` seconds ("full jitter"), so clients that lost the same
    node do not all come back at the same instant.
    """

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt``."""
        return random.uniform(0.0, min(self.maximum, self.initial * 2.0 ** min(attempt, 32)))


#: Close codes after which a client with failover connects again: the node went away,
#: broke, or shed load. Any other close (a refused token, a takeover) is final.
_RETRY_CLOSES = frozenset({None, 1001, 1006, 1011, 1012, 1013, 1014,
                           CloseCode.IDLE_TIMEOUT, CloseCode.SLOW_CONSUMER,
                           CloseCode.TOO_MANY_CONNECTIONS})
#: Error codes, refusing the hello or announcing a close, after which a client with failover
#: connects again: those of the close codes above.
_RETRY_ERRORS = frozenset({ErrorCode.SHUTTING_DOWN.value, ErrorCode.INTERNAL.value,
                           ErrorCode.TOO_MANY_CONNECTIONS.value,
                           ErrorCode.STORE_UNAVAILABLE.value, ErrorCode.IDLE_TIMEOUT.value,
                           ErrorCode.SLOW_CONSUMER.value})


class Client:
    """A client of one user, connected to a node. Make one with :func:`connect`.

    With failover on, the client outlives its connections: when one is lost it connects
    again (to the next URL, after a :class:`Backoff` delay), resumes from :attr:`last_seq`,
    sends again every message still waiting for its ``sent`` (same ids, so none is stored
    twice), watches the same users and repeats the last ``read`` acknowledgements; pending
    :meth:`send` and :meth:`last_seen` calls carry on, and :meth:`events` goes on yielding.
    The error frame that announces such a close (``shutting_down``...) is not yielded: the
    client recovers from it as from a lost connection.
    """

    def __init__(self, urls: Sequence[str], token: str, *, resume: int, timeout: float,
                 queue_size: int, reconnect: bool, backoff: Backoff,
                 attempts: int | None = None, ssl_context: ssl.SSLContext | None = None,
                 on_retry: Callable[[Failure], None] | None = None) -> None:
        if not urls:
            raise ValueError("at least one URL is needed")
        for url in urls:
            parse_url(url)
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self._urls = list(urls)
        self._token = token
        self._timeout = timeout
        self._reconnect = reconnect
        self._backoff = backoff
        self._attempts = attempts
        self._ssl_context = ssl_context
        self._on_retry = on_retry
        self._ws: WebSocketConnection | None = None
        self._conn = ClientConnection()
        self._up = trio.Event()
        self._lost = trio.Event()
        self._synced = trio.Event()
        self.welcome: Welcome | None = None
        self.user = ""
        #: The URL of the node the client is (or was last) connected to.
        self.url = ""
        #: How many times the client connected again after losing a connection.
        self.reconnects = 0
        #: The highest sequence number the application acknowledged; sent as ``resume``
        #: when connecting again.
        self.last_seq = resume
        self.closed: Closed | None = None
        #: The last failure, when the client gave up connecting again after losing a
        #: connection (``attempts`` in a row failed).
        self.gave_up: Failure | None = None
        self._last_error: Error | None = None
        self._sends: dict[str, _Waiter] = {}
        self._unsent: dict[str, Send] = {}
        self._queries: dict[str, list[_Waiter]] = {}
        self._watching: set[str] = set()
        self._reads: dict[str | None, int] = {}
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
            ChatError: The server refused the message, or the client closed for good
                before it was accepted.
            trio_websocket.ConnectionClosed: The connection ended first (without failover).
        """
        msg_id = id or new_id()
        waiter = self._sends[msg_id] = _Waiter()
        try:
            await self._send_messages([Send(msg_id, to, body)])
            result: Sent = await waiter.wait()
        finally:
            self._sends.pop(msg_id, None)
        return result

    async def submit(self, messages: Sequence[tuple[str, str, str]]) -> None:
        """Pipeline ``(id, to, body)`` messages without waiting for SENT.

        Their ``sent`` frames (or ``error`` frames with ``ref`` = id) arrive through
        :meth:`events`.
        """
        await self._send_messages([Send(msg_id, to, body) for msg_id, to, body in messages])

    async def ack(self, upto: int) -> None:
        """Acknowledge everything up to sequence ``upto`` as delivered."""
        await self._write([Ack("delivered", upto)])
        self.last_seq = max(self.last_seq, upto)

    async def read(self, upto: int, peer: str | None = None) -> None:
        """Mark messages up to ``upto`` read (only ``peer``'s when given).

        A read acknowledgement also acknowledges delivery of everything up to ``upto``.
        """
        self._reads[peer] = max(self._reads.get(peer, 0), upto)
        await self._write([Ack("read", upto, peer)])
        self.last_seq = max(self.last_seq, upto)

    async def last_seen(self, user: str) -> Presence:
        """Ask for ``user``'s presence and last-seen time."""
        waiter = _Waiter()
        self._queries.setdefault(user, []).append(waiter)
        await self._write([LastSeenQuery(user)])
        result: Presence = await waiter.wait()
        return result

    async def wait_synced(self) -> None:
        """Wait until the server has sent everything that was queued for this connection.

        The server marks the end of the backlog it streams after the welcome (``synced``,
        protocol version 2). When this returns, every message and receipt that was waiting
        when the connection opened is in :meth:`events`, ahead of anything newer. After a
        reconnection it waits for the new connection's backlog.

        Raises:
            ChatError: ``unsupported_version``: the server speaks only version 1, which
                does not mark the end of the backlog.
        """
        await self._up.wait()
        if self.welcome is not None and self.welcome.version < Synced.SINCE:
            raise ChatError(ErrorCode.UNSUPPORTED_VERSION.value,
                            "the server does not mark the end of the backlog (version 1)")
        await self._synced.wait()

    async def subscribe(self, users: Sequence[str]) -> None:
        """Watch the presence of ``users``; updates arrive through :meth:`events`."""
        self._watching.update(users)
        await self._write([Subscribe(list(users))])

    async def unsubscribe(self, users: Sequence[str]) -> None:
        """Stop watching the presence of ``users``."""
        self._watching.difference_update(users)
        await self._write([Unsubscribe(list(users))])

    async def aclose(self) -> None:
        """Close the connection (code 1000) and stop failing over; :func:`connect` does
        this on exit."""
        self._reconnect = False
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await ws.aclose()

    async def _send_messages(self, frames: list[Send]) -> None:
        """Write messages now if connected; with failover they are also kept until their
        ``sent`` arrives, and written again on the next connection."""
        if self._reconnect:
            for frame in frames:
                self._unsent[frame.id] = frame
            if self._ws is None:
                return  # the next connection sends them
            with contextlib.suppress(ConnectionClosed):
                await self._write_now(self._ws, list(frames))
            return
        await self._write(list(frames))

    async def _write(self, frames: Sequence[Frame]) -> None:
        """Write frames on the current connection, waiting for one while failing over."""
        while True:
            ws, lost = self._ws, self._lost
            if ws is None:
                if self.closed is not None or not self._reconnect:
                    raise ChatError(*self._close_cause())
                await self._up.wait()
                continue
            try:
                await self._write_now(ws, frames)
                return
            except ConnectionClosed:
                if not self._reconnect:
                    raise
                await lost.wait()  # until the reader has let this connection go

    async def _write_now(self, ws: WebSocketConnection, frames: Sequence[Frame]) -> None:
        limits = self._conn.codec.limits
        for start in range(0, len(frames), limits.max_frames):
            await ws.send_message(self._conn.send(frames[start:start + limits.max_frames]))

    # -- receiving ---------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Yield incoming messages, receipts, presence updates and pipelined results.

        The iteration ends when the client closes for good; :attr:`closed` says how.
        """
        async for event in self._events_out:
            yield event

    # -- connections -------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Connect, serve the connection, and (with failover) connect again, until final."""
        started = False
        attempt = 0  # rounds of backoff since the last connection
        failures = 0  # failed attempts since the last connection
        give_up = trio.current_time() + self._timeout
        index = 0
        try:
            while True:
                url = self._urls[index % len(self._urls)]
                index += 1
                try:
                    async with self._open(url) as first:
                        attempt = failures = 0
                        if not started:
                            started = True
                            task_status.started()
                        else:
                            self.reconnects += 1
                        closed, final = await self._serve(first)
                except (ConnectFailed, ChatError) as exc:
                    if isinstance(exc, ChatError) and exc.code not in _RETRY_ERRORS:
                        raise
                    failures += 1
                    failure = Failure(url, exc.cause if isinstance(exc, ConnectFailed)
                                      else f"refused: {exc.code}: {exc.message}")
                    logger.info("connect_failed url=%s cause=%s", url, failure.cause)
                    if self._gives_up(started, failures, give_up):
                        if not started:
                            raise
                        self.gave_up = failure
                        return
                    self._retrying(failure)
                else:
                    if final or not self._reconnect:
                        self.closed = closed
                        return
                    failure = Failure(url, _lost_cause(closed), lost=True)
                    logger.info("connection_lost url=%s cause=%s", url, failure.cause)
                    self._retrying(failure)
                if index % len(self._urls) == 0 or not started:
                    await trio.sleep(self._backoff.delay(attempt))
                    attempt += 1
        finally:
            self._finish()

    def _gives_up(self, started: bool, failures: int, give_up: float) -> bool:
        """Whether the client stops after ``failures`` failed attempts in a row."""
        if self._attempts is not None and failures >= self._attempts:
            return True
        if started:
            return False
        return (self._attempts is None and not self._reconnect) or (
            trio.current_time() >= give_up)

    def _retrying(self, failure: Failure) -> None:
        if self._on_retry is not None:
            self._on_retry(failure)

    @contextlib.asynccontextmanager
    async def _open(self, url: str) -> AsyncIterator[list[Frame]]:
        """Connect to ``url`` and log in; yields the frames that came with the welcome.

        Raises:
            ConnectFailed: No connection, or no welcome within the timeout.
            ChatError: The server refused the hello.
        """
        conn = ClientConnection()
        async with open_websocket(url, ssl_context=self._ssl_context, timeout=self._timeout,
                                  max_message_size=conn.codec.limits.max_frame_bytes) as ws:
            with trio.move_on_after(self._timeout) as hello:
                try:
                    await ws.send_message(conn.hello(self._token, self.last_seq))
                    frames = conn.receive(await ws.get_message())
                    welcome = frames[0]
                    assert isinstance(welcome, Welcome)
                    self.welcome, self.user, self.url = welcome, welcome.user, url
                    self._conn, self._last_error = conn, None
                    if self._synced.is_set():  # a new connection, a new backlog
                        self._synced = trio.Event()
                    if self.reconnects or self._unsent:
                        await self._restore(ws)
                except ProtocolError as exc:
                    raise ChatError(exc.code.value, exc.message) from None
                except ConnectionClosed as exc:
                    raise ChatError(close_info(exc)[1] or ErrorCode.INTERNAL.value,
                                    "connection closed during hello") from None
            if hello.cancelled_caught:
                raise ConnectFailed(url, f"no welcome within {self._timeout:g} s")
            self._ws = ws
            self._lost = trio.Event()
            self._up.set()
            try:
                yield frames[1:]
            finally:
                if self._reconnect:
                    self._ws = None  # writers wait for the next connection
                # else writers keep the closed one: it raises ConnectionClosed, as documented
                self._lost.set()
                self._up = trio.Event()

    async def _restore(self, ws: WebSocketConnection) -> None:
        """On a new connection: what the last one left unfinished, before anything else."""
        frames: list[Frame] = []
        if self._watching:
            frames.append(Subscribe(sorted(self._watching)))
        frames += [Ack("read", upto, peer) for peer, upto in self._reads.items()]
        frames += [LastSeenQuery(user) for user, waiters in self._queries.items()
                   for _ in waiters]
        written: set[str] = set()
        while True:  # messages queued while this loop writes are written too
            todo = [frame for msg_id, frame in self._unsent.items() if msg_id not in written]
            if not todo and not frames:
                return
            written.update(frame.id for frame in todo)
            await self._write_now(ws, [*frames, *todo])
            frames = []

    async def _serve(self, first: list[Frame]) -> tuple[Closed, bool]:
        """Dispatch frames until the connection ends; how it ended, and whether that is
        final.

        One task dispatches, so frames reach the application in the order the server
        sent them.
        """
        ws = self._ws
        assert ws is not None
        try:
            for frame in first:
                await self._dispatch(frame)
            while True:
                data = await ws.get_message()
                for frame in self._conn.receive(data):
                    await self._dispatch(frame)
        except ConnectionClosed as exc:
            code, text = close_info(exc)
            return Closed(code, text, self._last_error), code not in _RETRY_CLOSES
        except ProtocolError as exc:
            await ws.aclose(4400, exc.code.value)
            return Closed(None, exc.code.value, self._last_error), True

    def _finish(self) -> None:
        """The client is closed for good: end the events and fail whatever waits."""
        if self.closed is None:
            self.closed = Closed(None, "cannot_connect" if self.gave_up else "closed",
                                 self._last_error)
        self._events_in.close()
        self._up.set()
        failure = ChatError(*self._close_cause())
        for waiter in self._sends.values():
            waiter.resolve(error=failure)
        for waiters in self._queries.values():
            for waiter in waiters:
                waiter.resolve(error=failure)

    def _close_cause(self) -> tuple[str, str]:
        if self.gave_up is not None:
            return "cannot_connect", f"{self.gave_up.url}: {self.gave_up.cause}"
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
                self._unsent.pop(msg_id, None)
                self._sends[msg_id].resolve(frame)
            case Error(ref=ref) if ref is not None and ref in self._sends:
                self._unsent.pop(ref, None)
                self._sends[ref].resolve(error=ChatError(frame.code, frame.message))
            case Presence(user=user, watch=False) if self._queries.get(user):
                self._queries[user].pop(0).resolve(frame)
                if not self._queries[user]:
                    del self._queries[user]
            case Error(ref=ref):
                if ErrorCode.is_fatal(frame.code):
                    self._last_error = frame
                    if self._reconnect and frame.code in _RETRY_ERRORS:
                        return  # the close it announces is failed over like a lost connection
                elif ref is not None and frame.code != ErrorCode.STORE_UNAVAILABLE.value:
                    self._unsent.pop(ref, None)  # refused for good (id_conflict...)
                await self._events_in.send(frame)
            case Sent(id=msg_id):
                self._unsent.pop(msg_id, None)
                await self._events_in.send(frame)
            case Presence():
                await self._events_in.send(frame)
            case Synced():
                self._synced.set()


def _lost_cause(closed: Closed) -> str:
    """Why a connection was lost: the error that announced the close, or the close code."""
    if closed.error is not None:
        return f"{closed.error.code}: {closed.error.message}"
    if closed.code is not None:
        return f"closed with {closed.code} {closed.reason or ''}".rstrip()
    return "the connection ended"


def close_info(exc: ConnectionClosed) -> tuple[int | None, str | None]:
    """The close code and reason of a closed connection, when known."""
    reason = exc.reason
    return (reason.code, reason.reason) if reason is not None else (None, None)


def new_id() -> str:
    """A fresh message id (a random UUID, hex)."""
    return uuid.uuid4().hex


@asynccontextmanager
async def connect(url: str | Sequence[str], token: str, *, resume: int = 0,
                  timeout: float = 10.0, queue_size: int = 1024,
                  reconnect: bool | None = None, backoff: Backoff | None = None,
                  attempts: int | None = None,
                  ca: str | os.PathLike[str] | ssl.SSLContext | None = None,
                  on_retry: Callable[[Failure], None] | None = None
                  ) -> AsyncIterator[Client]:
    """Connect, authenticate, and yield a :class:`Client`; close on exit.

    Args:
        url: ``ws://host:port`` (or ``wss://``) of a node, or several nodes' URLs, tried in
            turn.
        token: An HS256 JWT for the user.
        resume: The highest sequence number already processed (from a previous
            connection's :attr:`Client.last_seq`); the server treats it as acknowledged.
        timeout: Seconds allowed for connecting and authenticating (for the first
            connection, across every URL and retry).
        queue_size: Events buffered before the library stops reading the socket.
        reconnect: Fail over when a connection is lost (see :class:`Client`). Defaults to
            on when several URLs are given, off for one.
        backoff: Delays between attempts once every URL has been tried.
        attempts: The most attempts to connect in a row (each URL tried counts one) before
            the client gives up: for the first connection, and with failover after each
            lost connection (it then closes for good, with :attr:`Client.gave_up` saying
            why). None: no limit but ``timeout`` for the first connection (tried once
            without failover); after a lost connection, the client tries forever.
        ca: For ``wss://``: the CA certificates (a PEM file) to trust instead of the
            system's, or the TLS context to use.
        on_retry: Called with a :class:`Failure` each time an attempt to connect fails, or
            a connection is lost, and the client tries again.

    Raises:
        ChatError: The server refused the hello (bad token, unsupported version...).
        ConnectFailed: No server could be reached; an :class:`OSError` whose ``cause``
            says why (the last attempt's).
        OSError: ``ca`` names a file that cannot be read or holds no certificate.
        ValueError: A URL is not ``ws://`` or ``wss://``.
    """
    urls = [url] if isinstance(url, str) else list(url)
    ssl_context: ssl.SSLContext | None = None
    if isinstance(ca, ssl.SSLContext):
        ssl_context = ca
    elif any(parse_url(u)[3] for u in urls):
        ssl_context = client_context(ca)
    client = Client(urls, token, resume=resume, timeout=timeout, queue_size=queue_size,
                    reconnect=len(urls) > 1 if reconnect is None else reconnect,
                    backoff=backoff or Backoff(), attempts=attempts, ssl_context=ssl_context,
                    on_retry=on_retry)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception surfaces as itself, not wrapped by our nursery.
        if len(group.exceptions) == 1:
            # Keep its own cause, not the group.
            only = group.exceptions[0]
            raise only from only.__cause__
        raise
