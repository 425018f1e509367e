"""Sans-IO connection state: what may be said when, on each side of a connection.

:class:`ServerConnection` and :class:`ClientConnection` take message bytes in and give
frames out (``receive``), and take frames in and give message bytes out (``send``), in the
style of wsproto. They own the opening handshake: the first client frame must be a
:class:`Hello`, sent once, naming a version both sides speak; the first server frame is a
:class:`Welcome` or an :class:`Error`. They never touch a socket, so tests drive them by
hand.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from ._codec import Codec, Limits, client_codec, server_codec
from ._errors import ErrorCode, ProtocolError
from ._frames import PROTOCOL_VERSIONS, Error, Frame, Hello, Welcome

__all__ = ["ClientConnection", "ConnectionState", "ServerConnection", "negotiate"]


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    OPENING = "opening"  # waiting for hello (server) or welcome (client)
    OPEN = "open"
    CLOSED = "closed"


def negotiate(offered: Sequence[int], supported: Sequence[int] = PROTOCOL_VERSIONS) -> int:
    """Pick the highest version both sides speak.

    Raises:
        ProtocolError: ``unsupported_version`` when there is none.
    """
    common = set(offered) & set(supported)
    if not common:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"server speaks versions {list(supported)}")
    return max(common)


class _Endpoint:
    """What both sides share: a codec, a state, and encoding outbound frames."""

    __slots__ = ("codec", "state")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.state = ConnectionState.OPENING

    def send(self, frames: Iterable[Frame]) -> bytes:
        """Encode frames for the peer into one message."""
        return self.codec.encode(frames)

    def _decode(self, data: bytes | bytearray | str) -> list[Frame]:
        if self.state is ConnectionState.CLOSED:
            raise ProtocolError(ErrorCode.BAD_FIELD, "the connection is closed")
        return self.codec.decode(data)


class ServerConnection(_Endpoint):
    """The server's side of one connection.

    Args:
        limits: The decoding limits to enforce.
    """

    __slots__ = ("version",)

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(server_codec(limits))
        self.version = 0

    def receive(self, data: bytes | bytearray | str) -> list[Frame]:
        """Decode one message from the client.

        While opening, the message must start with a :class:`Hello`; its version is
        negotiated here and ``state`` becomes OPEN. Frames after the hello in the same
        message are returned with it.

        Raises:
            ProtocolError: On any violation; the connection is then CLOSED.
        """
        try:
            frames = self._decode(data)
            for index, frame in enumerate(frames):
                if isinstance(frame, Hello):
                    if self.state is not ConnectionState.OPENING or index:
                        raise ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "hello sent twice")
                    self.version = self.codec.version = negotiate(frame.versions)
                    self.state = ConnectionState.OPEN
                elif self.state is ConnectionState.OPENING:
                    raise ProtocolError(ErrorCode.HELLO_REQUIRED,
                                        f"first frame must be hello, not {frame.TYPE}")
        except ProtocolError:
            self.state = ConnectionState.CLOSED
            raise
        return frames


class ClientConnection(_Endpoint):
    """The client's side of one connection.

    Args:
        limits: The decoding limits to enforce on server messages.
    """

    __slots__ = ("welcome",)

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(client_codec(limits))
        self.welcome: Welcome | None = None

    def hello(self, token: str, resume: int = 0) -> bytes:
        """The opening message: a hello offering every version this library speaks."""
        return self.codec.encode([Hello(list(PROTOCOL_VERSIONS), token, resume)])

    def receive(self, data: bytes | bytearray | str) -> list[Frame]:
        """Decode one message from the server.

        Raises:
            ProtocolError: The server's message is malformed, or the server refused the
                hello (the error frame's code is raised); the connection is then CLOSED.
        """
        try:
            frames = self._decode(data)
            if self.state is ConnectionState.OPENING:
                first = frames[0]
                if isinstance(first, Welcome):
                    if first.version not in PROTOCOL_VERSIONS:
                        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                            f"server chose version {first.version}")
                    self.welcome = first
                    self.codec.version = first.version
                    self.state = ConnectionState.OPEN
                elif isinstance(first, Error):
                    raise ProtocolError(_known_code(first.code), first.message, ref=first.ref)
                else:
                    raise ProtocolError(ErrorCode.HELLO_REQUIRED,
                                        f"server's first frame was {first.TYPE}, not welcome")
        except ProtocolError:
            self.state = ConnectionState.CLOSED
            raise
        return frames


def _known_code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL
