"""Protocol error codes, WebSocket close codes and the one protocol error type.

Every way a peer can get the protocol wrong maps to one :class:`ErrorCode`. The code is
part of the wire contract (docs/protocol.md lists them all): clients match on it, so a
code is never renamed or reused. Some errors end the connection; those carry the close
code the server uses.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode", "ProtocolError"]


class CloseCode(enum.IntEnum):
    """WebSocket close codes chatd uses (RFC 6455 ones and its own 4xxx range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    PROTOCOL_ERROR = 4400
    AUTH_FAILED = 4401
    AUTH_TIMEOUT = 4408
    SESSION_REPLACED = 4409
    IDLE_TIMEOUT = 4410
    SLOW_CONSUMER = 4420
    UNSUPPORTED_VERSION = 4426
    TOO_MANY_CONNECTIONS = 4429


class ErrorCode(enum.StrEnum):
    """Stable error codes carried by ``error`` frames."""

    BAD_CBOR = "bad_cbor"
    TEXT_FRAME = "text_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    TOO_DEEP = "too_deep"
    TOO_MANY_ITEMS = "too_many_items"
    TOO_MANY_FRAMES = "too_many_frames"
    STRING_TOO_LONG = "string_too_long"
    NOT_A_MAP = "not_a_map"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    UNSUPPORTED_VERSION = "unsupported_version"
    HELLO_REQUIRED = "hello_required"
    ALREADY_AUTHENTICATED = "already_authenticated"
    AUTH_FAILED = "auth_failed"
    TOKEN_EXPIRED = "token_expired"
    AUTH_TIMEOUT = "auth_timeout"
    SESSION_REPLACED = "session_replaced"
    IDLE_TIMEOUT = "idle_timeout"
    SLOW_CONSUMER = "slow_consumer"
    ID_CONFLICT = "id_conflict"
    STORE_UNAVAILABLE = "store_unavailable"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"

    @classmethod
    def is_fatal(cls, code: str) -> bool:
        """Whether an error frame with ``code`` announces the end of the connection.

        Codes this implementation does not know are taken as fatal.
        """
        try:
            return cls(code) in _FATAL
        except ValueError:
            return True


# Errors that end the connection, with the close code that ends it. Any code not listed
# here is answered with an error frame and the connection stays open.
_FATAL: dict[ErrorCode, CloseCode] = {
    ErrorCode.BAD_CBOR: CloseCode.PROTOCOL_ERROR,
    ErrorCode.TEXT_FRAME: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.FRAME_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.TOO_DEEP: CloseCode.PROTOCOL_ERROR,
    ErrorCode.TOO_MANY_ITEMS: CloseCode.PROTOCOL_ERROR,
    ErrorCode.TOO_MANY_FRAMES: CloseCode.PROTOCOL_ERROR,
    ErrorCode.STRING_TOO_LONG: CloseCode.PROTOCOL_ERROR,
    ErrorCode.NOT_A_MAP: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNKNOWN_TYPE: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNKNOWN_FIELD: CloseCode.PROTOCOL_ERROR,
    ErrorCode.MISSING_FIELD: CloseCode.PROTOCOL_ERROR,
    ErrorCode.BAD_FIELD: CloseCode.PROTOCOL_ERROR,
    ErrorCode.UNSUPPORTED_VERSION: CloseCode.UNSUPPORTED_VERSION,
    ErrorCode.HELLO_REQUIRED: CloseCode.PROTOCOL_ERROR,
    ErrorCode.ALREADY_AUTHENTICATED: CloseCode.PROTOCOL_ERROR,
    ErrorCode.AUTH_FAILED: CloseCode.AUTH_FAILED,
    ErrorCode.TOKEN_EXPIRED: CloseCode.AUTH_FAILED,
    ErrorCode.AUTH_TIMEOUT: CloseCode.AUTH_TIMEOUT,
    ErrorCode.SESSION_REPLACED: CloseCode.SESSION_REPLACED,
    ErrorCode.IDLE_TIMEOUT: CloseCode.IDLE_TIMEOUT,
    ErrorCode.SLOW_CONSUMER: CloseCode.SLOW_CONSUMER,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    ErrorCode.TOO_MANY_CONNECTIONS: CloseCode.TOO_MANY_CONNECTIONS,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}


class ProtocolError(Exception):
    """A peer broke the protocol, or a request could not be honoured.

    Args:
        code: The stable error code sent to the peer.
        message: A short human-readable explanation; never contains message bodies.
        ref: The message id the error refers to, when there is one.
    """

    def __init__(self, code: ErrorCode, message: str, *, ref: str | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.ref = ref

    @property
    def close_code(self) -> CloseCode | None:
        """The close code that ends the connection, or None if the error is not fatal."""
        return _FATAL.get(self.code)
