"""TLS on the server: ``wss://`` served directly, with ``tls_cert`` and ``tls_key``.

:class:`TlsWebSocket` is the server's :class:`~chatd.transport.WebSocket` with TLS between it
and the socket: the ssl module's memory BIOs, so the transport keeps its way of working
(reads straight from the socket, synchronous writes queued for :meth:`WebSocket.drain`)
with records decrypted as they are read and encrypted as messages are written. The TLS
handshake comes first, within the WebSocket handshake's time (``handshake_timeout``); a
client that does not speak TLS, or refuses the certificate, fails it and is disconnected
without touching any other connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

from chatd.protocol.websocket import close_frame
from chatd.transport import RECV_SIZE, WebSocket

__all__ = ["TlsError", "TlsWebSocket", "server_context"]


class TlsError(Exception):
    """The certificate or key cannot be used (unreadable, not PEM, not a pair)."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 or later, the certificate chain and its key.

    Args:
        cert: The certificate, then any intermediate certificates, in PEM.
        key: The certificate's private key, in PEM, without a passphrase.

    Raises:
        TlsError: A file cannot be read, holds no PEM certificate (or key), the key is
            not the certificate's, or it needs a passphrase; the message names the file.
    """
    for path, what in ((cert, "certificate"), (key, "key")):
        try:
            path.read_bytes()
        except OSError as exc:
            raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}"
                           ) from None
    try:
        ssl.create_default_context(cafile=cert)
    except ssl.SSLError:
        raise TlsError(f"the TLS certificate {cert} holds no PEM certificate") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> str:  # else OpenSSL would ask on the terminal
        raise TlsError(f"the TLS key {key} needs a passphrase; give chatd one without")

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the TLS key {key} is not the key of the certificate {cert}"
                           ) from None
        raise TlsError(f"the TLS key {key} holds no PEM private key") from None
    return context


def _reason(exc: ssl.SSLError) -> str:
    """``key values mismatch`` from ``[X509: KEY_VALUES_MISMATCH] key values mismatch
    (_ssl.c:4045)``."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return text.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]


class TlsWebSocket(WebSocket):
    """A server-side WebSocket connection over TLS.

    Args:
        sock: The accepted TCP socket; the connection owns it from now on.
        max_message: The largest client message accepted, in bytes.
        context: The server's TLS context (:func:`server_context`).
    """

    __slots__ = ("_incoming", "_notified", "_outgoing", "_tls")

    def __init__(self, sock: socket.socket, max_message: int, context: ssl.SSLContext
                 ) -> None:
        super().__init__(sock, max_message)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._notified = False

    async def handshake(self) -> None:
        """The TLS handshake, then the WebSocket one; the caller bounds the time.

        Raises:
            ConnectionClosed: The TLS handshake failed (the client does not speak TLS, or
                refused the certificate), or the client went away.
            HandshakeError: The WebSocket upgrade request was refused.
        """
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._incoming.write(await WebSocket._recv(self))
            except ssl.SSLError as exc:
                self._flush()  # the alert, if any
                self._closed = (1006, f"TLS: {_reason(exc)}")
                raise self._over() from None
        self._flush()
        await super().handshake()

    async def _recv(self) -> bytes:
        """Decrypted bytes: what the TLS layer holds, else what the next reads bring."""
        while True:
            data = self._decrypt()
            if data:
                return data
            self._incoming.write(await WebSocket._recv(self))

    def _decrypt(self) -> bytes:
        chunks: list[bytes] = []
        try:
            while True:
                chunks.append(self._tls.read(RECV_SIZE))
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the client's close_notify: the end of the stream
            self._closed = (1006, "connection lost")
        except ssl.SSLError as exc:
            self._closed = (1006, f"TLS: {_reason(exc)}")
        self._flush()  # what reading produced (a key update's answer)
        data = b"".join(chunks)
        if not data and self._closed is not None:
            raise self._over()
        return data

    def _write(self, data: bytes) -> None:
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            self._lost(OSError(f"TLS: {_reason(exc)}"))
            return
        self._flush()

    def _flush(self) -> None:
        """Hand what TLS produced to the socket (or to the queue :meth:`drain` writes)."""
        if self._outgoing.pending:
            WebSocket._write(self, self._outgoing.read())

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send a close frame, then TLS's close_notify, then end the connection (as
        :meth:`WebSocket.close`)."""
        if not self._sent_close:
            self._sent_close = True
            self._write(close_frame(code, reason))
        if not self._notified:
            self._notified = True
            with contextlib.suppress(ssl.SSLError):  # want-read: the client's is to come
                self._tls.unwrap()
            self._flush()
        await super().close(code, reason, timeout=timeout)
