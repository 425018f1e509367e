"""Opening a client's WebSocket connection, and saying in words why it failed.

:func:`open_websocket` connects in three steps, each of which can fail on its own: the TCP
connection, the TLS handshake (``wss://`` only), and the WebSocket handshake. Every failure
becomes a :class:`ConnectFailed` whose ``cause`` says which step failed and why: ``Connection
refused``, ``TLS: certificate verify failed: unable to get local issuer certificate``,
``the server answered HTTP 404``...

trio-websocket's own ``open_websocket_url`` does the TLS handshake inside its reader task and
turns a failure there, or a server that closes the connection during the WebSocket
handshake, into a time-out; so the TLS handshake is done here first, and the stream is
watched while trio-websocket's handshake runs on it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

__all__ = ["ConnectFailed", "client_context", "describe", "open_websocket", "parse_url"]

#: Seconds given to closing a connection (the close handshake) before it is dropped.
CLOSE_TIMEOUT = 2.0


class ConnectFailed(OSError):
    """No connection could be made to a URL.

    Attributes:
        url: The URL.
        cause: Why, in words (``Connection refused``, ``TLS: ...``).
    """

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"{url}: {cause}")
        self.url = url
        self.cause = cause


def client_context(ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A TLS context for ``wss://`` that trusts ``ca`` (PEM), or the system's CAs.

    Raises:
        OSError: The CA file cannot be read, or holds no certificate (:class:`ssl.SSLError`).
    """
    return ssl.create_default_context(cafile=None if ca is None else os.fspath(ca))


@asynccontextmanager
async def open_websocket(url: str, *, ssl_context: ssl.SSLContext | None,
                         max_message_size: int, timeout: float
                         ) -> AsyncIterator[WebSocketConnection]:
    """Connect to a ``ws://`` or ``wss://`` URL; close the connection when the block ends.

    Args:
        url: The server's URL.
        ssl_context: The TLS context for ``wss://`` (None: the system's CAs).
        max_message_size: The largest message accepted from the server, in bytes.
        timeout: Seconds allowed for the three steps together.

    Raises:
        ConnectFailed: A step failed or took too long.
        ValueError: The URL is not a WebSocket URL (:func:`parse_url`).
    """
    host, port, resource, tls = parse_url(url)
    deadline = trio.current_time() + timeout
    stream = _WatchedStream(await _open_stream(url, host, port, ssl_context if tls else None,
                                               deadline))
    name = f"[{host}]" if ":" in host else host
    host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
    try:
        async with trio.open_nursery() as nursery:
            ws = await _handshake(url, nursery, stream, host_header, resource,
                                  max_message_size, deadline)
            try:
                yield ws
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                    scope.shield = True
                    await ws.aclose()
                # The reader ends once the close handshake is over (a close begun by another
                # task may still wait for it), or is cancelled after as long again.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
    except BaseExceptionGroup as group:
        # trio-websocket's reader raises ConnectionRejected for an HTTP answer.
        for exc in _chain(group):
            if isinstance(exc, ConnectionRejected):
                raise ConnectFailed(url, f"the server answered HTTP {exc.status_code}, not "
                                         "a WebSocket handshake") from None
        if len(group.exceptions) == 1:
            only = group.exceptions[0]
            raise only from only.__cause__
        raise


def parse_url(url: str) -> tuple[str, int, str, bool]:
    """The host, port, resource (path and query) of a WebSocket URL, and whether it is
    ``wss://``.

    Raises:
        ValueError: It is not a ``ws://`` or ``wss://`` URL with a host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL must be ws://HOST:PORT or wss://HOST:PORT, not {url!r} "
                         f"({exc})") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"URL must be ws://HOST:PORT or wss://HOST:PORT, not {url!r}")
    tls = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port or (443 if tls else 80), resource, tls


async def _open_stream(url: str, host: str, port: int, ssl_context: ssl.SSLContext | None,
                       deadline: float) -> trio.abc.Stream:
    """TCP, then TLS if ``ssl_context`` is given, by ``deadline``."""
    with trio.move_on_at(deadline):
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ConnectFailed(url, describe(exc)) from None
    if deadline <= trio.current_time():
        raise ConnectFailed(url, "no TCP connection in time")
    if ssl_context is None:
        return tcp
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
    with trio.move_on_at(deadline):
        try:
            await stream.do_handshake()
            return stream
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            raise ConnectFailed(url, describe(exc)) from None
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
    raise ConnectFailed(url, "no TLS handshake in time")


async def _handshake(url: str, nursery: trio.Nursery, stream: _WatchedStream, host: str,
                     resource: str, max_message_size: int, deadline: float
                     ) -> WebSocketConnection:
    """trio-websocket's client handshake, ended early if the stream breaks or ends."""
    opened: list[WebSocketConnection] = []
    async with trio.open_nursery() as race:

        async def handshake() -> None:
            # Typed for trio's socket and TLS streams, documented (and written) for any.
            opened.append(await wrap_client_stream(
                nursery, stream, host, resource,  # type: ignore[arg-type]
                max_message_size=max_message_size))
            race.cancel_scope.cancel()

        async def watch() -> None:
            await stream.ended.wait()
            race.cancel_scope.cancel()

        race.cancel_scope.deadline = deadline
        race.start_soon(handshake)
        race.start_soon(watch)
    if opened:
        return opened[0]
    await trio.aclose_forcefully(stream)
    if stream.ended.is_set():
        raise ConnectFailed(url, f"{stream.cause} during the WebSocket handshake")
    raise ConnectFailed(url, "no answer to the WebSocket handshake in time")


class _WatchedStream(trio.abc.Stream):
    """A stream that notes when it ends or breaks, and why (:attr:`ended`, :attr:`cause`)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self.ended = trio.Event()
        self.cause = ""

    def _note(self, cause: str) -> None:
        if not self.ended.is_set():
            self.cause = cause
            self.ended.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._inner.send_all(data)
        except trio.BrokenResourceError as exc:
            self._note(describe(exc))
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._inner.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._note(describe(exc))
            raise
        if not data:
            self._note("the server closed the connection")
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


def describe(exc: BaseException) -> str:
    """Why a connection failed, in words, from the exception and what caused it."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {_ssl_reason(cause)}"
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno is not None:
            if isinstance(cause.errno, int) and cause.errno > 0:
                return os.strerror(cause.errno)
            return str(cause.strerror)
    if isinstance(exc, trio.BrokenResourceError):
        return "the connection broke"
    return str(exc) or type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of any group among them."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if any(item is known for known in seen):
            continue
        seen.append(item)
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        todo.extend(link for link in (item.__cause__, item.__context__) if link is not None)
    return seen


def _ssl_reason(exc: ssl.SSLError) -> str:
    """``wrong version number`` from ``[SSL: WRONG_VERSION_NUMBER] wrong version number
    (_ssl.c:1006)``."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = text.split("] ", 1)[-1]
    text = text.split(" (_ssl.c", 1)[0]
    if exc.reason == "WRONG_VERSION_NUMBER":
        return f"{text} (is the server speaking TLS?)"
    return text
