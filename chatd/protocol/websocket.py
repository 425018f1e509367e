"""The server's side of RFC 6455, sans-IO: the upgrade handshake and the frame layer.

chatd's server speaks WebSocket through this module rather than a general-purpose library
because the per-message path is where its CPU goes: a client message costs one buffer
slice, one XOR over the payload and one object, and a server message costs one header and
one concatenation. Only what a chat server needs is here. Frames from clients must be
masked; fragmented messages are reassembled up to ``max_message`` bytes, text checked as
UTF-8 fragment by fragment; pings are answered by the caller; there are no extensions (so
no compression) and no subprotocols.

Unmasking is the one step whose cost grows with the payload: it runs in C, in the
``websockets`` package's ``apply_mask`` (17 times faster than the big-integer XOR below on
a 1 KB message: 0.34 against 5.9 µs), and falls back to that XOR where the package was
installed without its compiled speedups.

Like wsproto, nothing here does I/O: :func:`accept_handshake` turns request bytes into
response bytes, :class:`FrameReader` turns received bytes into events, and
:func:`encode_frame` turns a payload into bytes to write. Every violation raises
:class:`WebSocketError` with the close code (or HTTP status) the peer should get.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
from collections.abc import Callable

import attrs

_apply_mask: Callable[[bytes | bytearray, bytes | bytearray], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # websockets built without its C extension
    _apply_mask = None

__all__ = [
    "MAX_REQUEST_BYTES",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Close",
    "FrameReader",
    "HandshakeError",
    "Message",
    "Ping",
    "Pong",
    "WebSocketError",
    "accept_handshake",
    "close_frame",
    "encode_frame",
]

#: The largest upgrade request accepted (request line and headers).
MAX_REQUEST_BYTES = 8192

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_REQUEST_END = b"\r\n\r\n"
_GET = b"GET "
#: RFC 6455 §4.2.1 asks for "HTTP/1.1 or higher"; RFC 9112 §2.3 gives the version one digit
#: on each side of the dot, and HTTP/2 and later are not spoken in this text form.
_HTTP_VERSIONS = frozenset(f"HTTP/1.{minor}" for minor in range(1, 10))
#: Headers a request may carry only once (see :func:`accept_handshake`).
_SINGLE_HEADERS = frozenset({"host", "sec-websocket-key", "sec-websocket-version"})


class HandshakeError(Exception):
    """The upgrade request cannot be accepted; answer with ``response`` and close.

    Attributes:
        status: The HTTP status sent back.
        response: The complete HTTP response to write.
    """

    def __init__(self, status: int, reason: str, extra_headers: str = "") -> None:
        super().__init__(reason)
        self.status = status
        body = reason.encode() + b"\n"
        self.response = (
            f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra_headers}\r\n").encode("latin-1") + body


_STATUS_TEXT = {400: "Bad Request", 426: "Upgrade Required"}


def accept_handshake(data: bytes) -> tuple[bytes, int] | None:
    """Check a client's upgrade request and build the 101 response.

    The request must be a ``GET`` over HTTP/1.1 or a later HTTP/1.x (RFC 6455 §4.2.1).
    Header names are case-insensitive. ``Host``, ``Sec-WebSocket-Key`` and
    ``Sec-WebSocket-Version`` must appear once (RFC 9112 §3.2; RFC 6455 §11.3.1 and
    §11.3.5): a request repeating one is refused with 400 rather than guessed at, since
    two keys or two hosts mean a broken client or a request spliced together on the way.
    Other headers may repeat, their lines joined by commas: for ``Connection`` and
    ``Upgrade``, which are comma-separated lists, that makes one list (RFC 9110 §5.3).

    Args:
        data: Bytes received so far on a new connection.

    Returns:
        None if the request is not complete yet; otherwise the response to write and how
        many bytes of ``data`` the request used (anything after it is WebSocket frames).

    Raises:
        HandshakeError: The request is malformed, too large, or not a WebSocket upgrade.
    """
    if not _GET.startswith(data[:4]):  # a TLS hello, another protocol: say so at once
        raise HandshakeError(400, "only GET upgrades to WebSocket")
    end = data.find(_REQUEST_END)
    if end < 0:
        if len(data) > MAX_REQUEST_BYTES:
            raise HandshakeError(400, "upgrade request too large")
        return None
    if end + 4 > MAX_REQUEST_BYTES:
        raise HandshakeError(400, "upgrade request too large")
    lines = data[:end].decode("latin-1").split("\r\n")
    request = lines[0].split(" ")
    if len(request) != 3 or not request[2].startswith("HTTP/"):
        raise HandshakeError(400, "malformed request line")
    if request[0] != "GET":
        raise HandshakeError(400, "only GET upgrades to WebSocket")
    if request[2] not in _HTTP_VERSIONS:
        raise HandshakeError(400, "WebSocket needs HTTP/1.1 or a later HTTP/1.x")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise HandshakeError(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        if key not in headers:
            headers[key] = value
        elif key in _SINGLE_HEADERS:
            raise HandshakeError(400, f"the {name} header appears more than once")
        else:
            headers[key] = f"{headers[key]}, {value}"
    if "host" not in headers:
        raise HandshakeError(400, "missing Host header")
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    upgrade = {token.strip().lower() for token in headers.get("upgrade", "").split(",")}
    if "upgrade" not in tokens or "websocket" not in upgrade:
        raise HandshakeError(400, "this endpoint only speaks WebSocket")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "WebSocket version 13 is required",
                             "Sec-WebSocket-Version: 13\r\n")
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "bad Sec-WebSocket-Key") from None
    accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest())
    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return response, end + 4


class WebSocketError(Exception):
    """The peer broke RFC 6455 or a limit; close the connection with ``code``.

    Attributes:
        code: The close code to send (1002, 1007 or 1009).
        reason: A short explanation, sent as the close reason.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen(slots=True)
class Message:
    """A complete data message: ``bytes`` for binary, ``str`` for text."""

    data: bytes | str


@attrs.frozen(slots=True)
class Ping:
    """A ping; the caller answers it with a pong carrying the same payload."""

    payload: bytes


@attrs.frozen(slots=True)
class Pong:
    """A pong, answering one of our pings (or unsolicited)."""

    payload: bytes


@attrs.frozen(slots=True)
class Close:
    """The peer's close frame: its code (1005 if none) and reason."""

    code: int
    reason: str


Event = Message | Ping | Pong | Close


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the repeating 4-byte ``mask`` (in C where available)."""
    if _apply_mask is not None:
        return _apply_mask(payload, mask)
    return _xor(payload, mask)


def _xor(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the repeating 4-byte ``mask``, as one big-integer operation."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * ((size + 3) >> 2))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little")


def _valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame.

    RFC 6455 §7.4 leaves 1000-2999 to the IANA registry, which assigns 1000-1003 and
    1007-1014 (1012-1014: service restart, try again later, bad gateway); 1004 is
    reserved and 1005, 1006 and 1015 must never be sent. 3000-4999 belong to libraries
    and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _BinaryParts:
    """The fragments of a binary message so far."""

    __slots__ = ("_parts",)

    def __init__(self, first: bytes) -> None:
        self._parts = [first]

    def add(self, payload: bytes, fin: bool) -> Message | None:
        """Add the next fragment; the whole message once ``fin`` marks the last one."""
        self._parts.append(payload)
        return Message(b"".join(self._parts)) if fin else None


class _TextParts:
    """The fragments of a text message so far, checked and decoded as each arrives.

    RFC 6455 §8.1 has an endpoint fail the connection as soon as the bytes it reads as
    UTF-8 are not UTF-8, so a fragment that no later one could make valid is refused when
    it arrives, not when the message is whole; a character split between fragments is
    fine. Python's UTF-8 decoder, told that more may follow, raises for every such fragment
    but one kind: it leaves ``ED A0``-``ED BF`` at the end undecoded, although that start
    of a UTF-16 surrogate can never be UTF-8, so that tail is checked here.

    Raises:
        WebSocketError: 1007 when the text is not UTF-8, from the constructor (the first
            fragment) or :meth:`add`.
    """

    __slots__ = ("_chars", "_tail")

    def __init__(self, first: bytes) -> None:
        self._chars: list[str] = []
        #: The start of a character that the next fragment continues (at most 3 bytes).
        self._tail = b""
        self.add(first, False)

    def add(self, payload: bytes, fin: bool) -> Message | None:
        """Add the next fragment; the whole message once ``fin`` marks the last one."""
        data = self._tail + payload if self._tail else payload
        try:
            text, used = codecs.utf_8_decode(data, "strict", fin)
        except UnicodeDecodeError:
            raise WebSocketError(1007, "text message is not UTF-8") from None
        self._chars.append(text)
        if fin:
            return Message("".join(self._chars))
        tail = self._tail = data[used:]
        if tail[:1] == b"\xed" and tail[1:2] >= b"\xa0":
            raise WebSocketError(1007, "text message is not UTF-8")
        return None


class FrameReader:
    """Parses masked client frames from a byte stream into :data:`Event` objects.

    Args:
        max_message: The largest data message accepted, in bytes, after reassembly;
            a larger one raises ``WebSocketError(1009)`` as soon as its header says so.
    """

    __slots__ = ("_buffer", "_ended", "_events", "_max_message", "_partial", "_size",
                 "error")

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        #: Received bytes of a frame not yet complete; empty between frames.
        self._buffer = bytearray()
        #: The fragmented message being received, if one is.
        self._partial: _BinaryParts | _TextParts | None = None
        self._size = 0
        self._events: list[Event] = []
        #: Whether a close frame or a violation ended the stream.
        self._ended = False
        #: The violation that ended the stream, once there is one.
        self.error: WebSocketError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes and return every event they complete, in order.

        Once a close frame has been returned, nothing after it counts: this call and
        every later one return nothing more.

        Raises:
            WebSocketError: The stream breaks the protocol or the size limit. Events
                completed before the offending frame are returned first; the error is
                raised by the next call, and by every call after it.
        """
        if self._ended:
            if self.error is not None:
                raise self.error
            return []
        try:
            return self._parse(data)
        except WebSocketError as err:
            self._ended = True
            self.error = err
            if self._events:
                return self._events
            raise

    def _parse(self, data: bytes) -> list[Event]:
        # While nothing is buffered, frames are parsed straight from ``data``. Only the
        # start of a frame not complete yet is kept, in a bytearray that grows in place,
        # so a large message arriving in many small reads is copied once, not per read.
        buffer = self._buffer
        buf: bytes | bytearray = data
        if buffer:
            buffer += data
            buf = buffer
        end = len(buf)
        pos = 0
        events: list[Event] = []
        self._events = events
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise WebSocketError(1002, "reserved bits set without an extension")
            if not second & 0x80:
                raise WebSocketError(1002, "client frames must be masked")
            opcode = first & 0x0F
            if opcode & 0x07 > 2:  # 3-7 and 11-15: refused before the rest arrives
                raise WebSocketError(1002, f"reserved opcode {opcode}")
            length = second & 0x7F
            head = pos + 2
            if opcode >= 8:
                if not first & 0x80 or length > 125:
                    raise WebSocketError(1002, "control frames are short and unfragmented")
            else:
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(buf[head:head + 2], "big")
                    head += 2
                    if length < 126:
                        raise WebSocketError(1002, "frame length not minimally encoded")
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(buf[head:head + 8], "big")
                    head += 8
                    if length < 65536 or length >> 63:
                        raise WebSocketError(1002, "frame length not minimally encoded")
                if self._size + length > self._max_message:
                    raise WebSocketError(
                        1009, f"message larger than {self._max_message} bytes")
            start = head + 4
            if end < start + length:
                break
            payload = _unmask(buf[start:start + length], buf[head:start])
            pos = start + length
            event = self._frame(opcode, bool(first & 0x80), payload)
            if event is not None:
                events.append(event)
                if type(event) is Close:
                    self._ended = True
                    pos = end  # nothing after a close frame counts
                    break
        if buf is buffer:
            del buffer[:pos]  # CPython moves the start; it compacts when half is unused
        elif pos < end:
            buffer += memoryview(data)[pos:]
        return events

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> Event | None:
        if opcode in (OP_BINARY, OP_TEXT):
            if self._partial is not None:
                raise WebSocketError(1002, "new message before the last one finished")
            if fin:
                return self._message(opcode == OP_TEXT, payload)
            self._size = len(payload)
            self._partial = _TextParts(payload) if opcode == OP_TEXT else _BinaryParts(payload)
            return None
        if opcode == OP_CONTINUATION:
            partial = self._partial
            if partial is None:
                raise WebSocketError(1002, "continuation frame outside a message")
            self._size += len(payload)
            message = partial.add(payload, fin)
            if fin:
                self._partial, self._size = None, 0
            return message
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        return _close(payload)  # the last opcode left: the header refused reserved ones

    @staticmethod
    def _message(text: bool, payload: bytes) -> Message:
        if not text:
            return Message(payload)
        try:
            return Message(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise WebSocketError(1007, "text message is not UTF-8") from None


def _close(payload: bytes) -> Close:
    if not payload:
        return Close(1005, "")
    if len(payload) == 1:
        raise WebSocketError(1002, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise WebSocketError(1002, f"invalid close code {code}")
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise WebSocketError(1007, "close reason is not UTF-8") from None


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked server frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and a reason cut to fit the 125-byte control limit."""
    if code == 1005:
        return encode_frame(OP_CLOSE, b"")
    cut = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + cut)
