"""The server's WebSocket connections: RFC 6455 over a non-blocking socket, on trio.

A :class:`WebSocket` drives the sans-IO layer in :mod:`chatd.protocol.websocket` with as
few task switches and system calls as it can. Reading tries ``recv`` first and only parks
the task (``trio.lowlevel.wait_readable``) when the socket is empty, or when the last
``recv`` returned less than it asked for (the socket was emptied, so trying again would
only fail); one ``recv`` can yield many client messages. Writing is synchronous:
:meth:`WebSocket.send` frames a message and writes it at once if the socket has room, so a
reply costs one ``send`` call and no task switch; what the socket cannot take waits in a
buffer that :meth:`WebSocket.drain` writes out when the socket is writable. Messages are
appended to that buffer whole and in order, so whatever is cut short by a close is cut on
a message boundary.

Only one task may call :meth:`receive` and only one may call :meth:`drain` (trio allows one
waiter per direction on a socket); any task may call :meth:`send`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket

import trio

from chatd.protocol.websocket import (
    OP_BINARY,
    OP_PING,
    OP_PONG,
    Close,
    FrameReader,
    HandshakeError,
    Message,
    Ping,
    WebSocketError,
    accept_handshake,
    close_frame,
    encode_frame,
)

__all__ = ["ConnectionClosed", "WebSocket", "is_fd_exhaustion"]

logger = logging.getLogger(__name__)

#: Bytes asked of the kernel per ``recv``.
RECV_SIZE = 65536
#: Consecutive reads that found data before the reader yields to other tasks anyway.
_FAIR_READS = 16


class ConnectionClosed(Exception):
    """The connection is over: closed by either side, or lost.

    Attributes:
        code: The close code (1006 if the connection was lost without a close frame).
        reason: The close reason, if any.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class WebSocket:
    """One server-side WebSocket connection on an accepted, non-blocking socket.

    Args:
        sock: The accepted TCP socket; the WebSocket owns it from now on.
        max_message: The largest client message accepted, in bytes (larger: close 1009).
    """

    __slots__ = ("_closed", "_drained", "_leftover", "_out", "_reader", "_reads", "_sent_close",
                 "_sock", "pong_at", "remote")

    def __init__(self, sock: socket.socket, max_message: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reader = FrameReader(max_message)
        self._out: list[bytes | memoryview] = []
        self._leftover = b""
        self._reads = 0
        self._drained = False
        self._sent_close = False
        #: Why the connection is over (close code, reason), once it is. Each raise makes
        #: a new :class:`ConnectionClosed` of it (:meth:`_over`): one kept here would hold
        #: its traceback, whose frames hold this WebSocket, a cycle only the collector's
        #: full passes free (a closed session's objects stayed behind with it).
        self._closed: tuple[int, str] | None = None
        #: trio time of the last pong received (0 if none).
        self.pong_at = 0.0
        try:
            peer = sock.getpeername()
        except OSError:
            peer = ("", 0)
        #: The peer's address without the port.
        self.remote = str(peer[0]) if isinstance(peer, tuple) else str(peer)

    # -- opening ---------------------------------------------------------------------

    async def handshake(self) -> None:
        """Read the upgrade request and answer it; the caller bounds the time.

        Raises:
            HandshakeError: The request was refused (the HTTP error was sent).
            ConnectionClosed: The client went away first.
        """
        data = b""
        while True:
            chunk = await self._recv()
            data += chunk
            try:
                result = accept_handshake(data)
            except HandshakeError as err:
                self._write(err.response)
                with trio.move_on_after(1.0):
                    await self.drain()
                raise
            if result is not None:
                response, used = result
                self._leftover = data[used:]
                self._write(response)
                return

    # -- reading ---------------------------------------------------------------------

    async def receive(self) -> list[bytes | str]:
        """Wait for client data messages and return every one that is complete.

        Pings are answered here; a pong sets :attr:`pong_at`.

        Raises:
            WebSocketError: The client broke RFC 6455 or the size limit.
            ConnectionClosed: The client closed the connection (its close was answered),
                or it was lost.
        """
        reader = self._reader
        while True:
            if reader.error is not None:
                raise reader.error
            if self._leftover:
                data, self._leftover = self._leftover, b""
            else:
                data = await self._recv()
            messages: list[bytes | str] = []
            for event in reader.feed(data):
                if type(event) is Message:
                    messages.append(event.data)
                elif type(event) is Ping:
                    if not self._sent_close:
                        self._write(encode_frame(OP_PONG, event.payload))
                elif type(event) is Close:
                    code = 1000 if event.code == 1005 else event.code
                    if not self._sent_close:
                        self._sent_close = True
                        self._write(close_frame(event.code))
                    self._closed = (code, event.reason)
                    if messages:  # what came before the close frame is still acted on
                        return messages
                    raise self._over()
                else:
                    self.pong_at = trio.current_time()
            if messages:
                return messages

    async def _recv(self) -> bytes:
        if self._closed is not None:
            raise self._over()
        sock = self._sock
        self._reads += 1
        if self._drained:  # the last read emptied the socket: wait rather than try
            self._reads = 0
            await trio.lowlevel.wait_readable(sock)
        elif self._reads >= _FAIR_READS:  # data kept coming: let other tasks run
            self._reads = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                self._reads = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                self._closed = (1006, exc.strerror or "connection lost")
                raise self._over() from None
            if not data:
                self._closed = (1006, "connection lost")
                raise self._over()
            # Less than asked for: the kernel had no more, so the next read would most
            # likely fail with EAGAIN. Skip that system call and wait for readiness.
            self._drained = len(data) < RECV_SIZE
            return data

    # -- writing ---------------------------------------------------------------------

    @property
    def unsent(self) -> bool:
        """Whether bytes wait for the socket to take them."""
        return bool(self._out)

    def send(self, data: bytes) -> None:
        """Send one binary message now, or queue it for :meth:`drain`; never blocks."""
        if not self._sent_close:
            self._write(encode_frame(OP_BINARY, data))

    def ping(self) -> None:
        """Send a ping; the pong sets :attr:`pong_at`."""
        if not self._sent_close:
            self._write(encode_frame(OP_PING, b""))

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out.append(data)
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._out.append(memoryview(data)[sent:])

    def _lost(self, exc: OSError) -> None:
        self._out.clear()
        if self._closed is None:
            self._closed = (1006, exc.strerror or "connection lost")

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the kernel.

        Raises:
            ConnectionClosed: The connection was lost (what was queued is dropped).
        """
        out, sock = self._out, self._sock
        while out:
            await trio.lowlevel.wait_writable(sock)
            while out:
                try:
                    sent = sock.send(out[0])
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._lost(exc)
                    break
                if sent < len(out[0]):
                    out[0] = memoryview(out[0])[sent:]
                    break
                del out[0]
        if self._closed is not None and self._closed[0] == 1006:
            raise self._over()

    def _over(self) -> ConnectionClosed:
        """A new exception saying why the connection is over (it is)."""
        assert self._closed is not None
        return ConnectionClosed(*self._closed)

    # -- closing ---------------------------------------------------------------------

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send a close frame after what is queued, then end the connection.

        Waits up to ``timeout`` for the queue to drain, then up to as long again for the
        client's close frame or end of stream (closing a socket with unread input would
        reset it and could destroy what the client has not read yet). Never raises.
        """
        with trio.move_on_after(timeout) as scope:
            scope.shield = True
            if not self._sent_close:
                self._sent_close = True
                self._write(close_frame(code, reason))
            with contextlib.suppress(ConnectionClosed):
                await self.drain()
        if not scope.cancelled_caught and self._closed is None:
            with trio.move_on_after(timeout) as scope:
                scope.shield = True
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionClosed, WebSocketError):
                    while True:
                        await self.receive()
        self.abort()

    def abort(self) -> None:
        """Close the socket at once."""
        self._out.clear()
        if self._closed is None:
            self._closed = (1006, "closed")
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            with contextlib.suppress(OSError):
                self._sock.close()


def is_fd_exhaustion(exc: OSError) -> bool:
    """Whether ``accept`` failed because this process or the system ran out of files."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
