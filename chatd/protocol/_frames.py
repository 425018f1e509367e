"""The frames of protocol versions 1 and 2, as attrs records with their wire schema.

A frame is a CBOR map whose key ``"t"`` names its type. Each record below declares, per
field, its wire key and a :class:`Kind` that says what values the field accepts; the codec
reads those declarations, so the records are the single source of truth for the schema
that docs/protocol.md describes.

Frames a client sends are in :data:`CLIENT_FRAMES`; frames a server sends are in
:data:`SERVER_FRAMES`. A type tag means one frame in each direction.

Version 2 adds to version 1 without changing it: a frame type or a field declared with
``since=2`` exists only on connections that negotiated version 2 (the codec neither sends
nor accepts it on a version 1 connection), so a version 1 client sees exactly version 1.
"""

from __future__ import annotations

import enum
import re
from typing import Any, ClassVar

import attrs

__all__ = [
    "CLIENT_FRAMES",
    "FRAMES",
    "MAX_RECEIPT_IDS",
    "PROTOCOL_VERSIONS",
    "SERVER_FRAMES",
    "Ack",
    "AckStatus",
    "ClientFrame",
    "Error",
    "Frame",
    "Hello",
    "Kind",
    "LastSeenQuery",
    "Msg",
    "Presence",
    "Receipt",
    "Send",
    "Sent",
    "ServerFrame",
    "Subscribe",
    "Synced",
    "Unsubscribe",
    "Welcome",
]

#: Protocol versions this implementation speaks, newest last.
PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)
#: Most message ids one receipt carries; larger acknowledgements make several receipts.
MAX_RECEIPT_IDS = 512

_IDENT = re.compile(r"[\x21-\x7e]{1,64}")
_MAX_INT = 2**63 - 1


class Kind(enum.Enum):
    """What values a field accepts on the wire."""

    IDENT = "ident"  # 1..64 printable ASCII characters, no spaces: user and message ids
    TEXT = "text"  # any UTF-8 string within the string limits
    UINT = "uint"  # integer 0 .. 2**63-1
    BOOL = "bool"
    IDENTS = "idents"  # array of IDENT
    UINTS = "uints"  # array of UINT
    STATUS = "status"  # "delivered" or "read"

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` is a well-formed value of this kind."""
        match self:
            case Kind.IDENT:
                return type(value) is str and _IDENT.fullmatch(value) is not None
            case Kind.TEXT:
                return type(value) is str
            case Kind.UINT:
                return type(value) is int and 0 <= value <= _MAX_INT
            case Kind.BOOL:
                return type(value) is bool
            case Kind.IDENTS:
                return type(value) is list and all(Kind.IDENT.accepts(v) for v in value)
            case Kind.UINTS:
                return type(value) is list and all(Kind.UINT.accepts(v) for v in value)
            case Kind.STATUS:
                return value in ("delivered", "read")


def _field(kind: Kind, *, wire: str | None = None, optional: bool = False,
           default: Any = None, since: int = 1) -> Any:
    """Declare a frame field: its kind, its wire key, whether it may be absent, and the
    protocol version that introduced it (a field added later must be optional)."""
    if since > 1 and not optional:
        raise ValueError("a field added by a later version must be optional")
    metadata = {"kind": kind, "wire": wire, "optional": optional, "since": since}
    if optional:
        return attrs.field(default=default, metadata=metadata)
    return attrs.field(metadata=metadata)


class AckStatus(enum.StrEnum):
    """The receipt states a recipient can acknowledge."""

    DELIVERED = "delivered"
    READ = "read"


@attrs.frozen
class Frame:
    """Base of every frame; ``TYPE`` is the wire type tag, ``SINCE`` the protocol version
    that introduced it, ``INDEX`` its position in :data:`FRAMES` (for tables indexed by
    frame type, such as the node's frame counters)."""

    TYPE: ClassVar[str] = ""
    SINCE: ClassVar[int] = 1
    INDEX: ClassVar[int] = -1


# -- client -> server -------------------------------------------------------------------


@attrs.frozen
class Hello(Frame):
    """First frame of a connection: protocol versions, credentials and resume point.

    ``resume`` is the highest sequence number the client has already processed; the server
    treats it as a delivered acknowledgement up to that number before streaming the backlog.
    """

    TYPE: ClassVar[str] = "hello"
    versions: list[int] = _field(Kind.UINTS)
    token: str = _field(Kind.TEXT)
    resume: int = _field(Kind.UINT, optional=True, default=0)


@attrs.frozen
class Send(Frame):
    """Send ``body`` to user ``to``; ``id`` is the client's idempotency key."""

    TYPE: ClassVar[str] = "send"
    id: str = _field(Kind.IDENT)
    to: str = _field(Kind.IDENT)
    body: str = _field(Kind.TEXT)


@attrs.frozen
class Ack(Frame):
    """Acknowledge every queued item up to sequence ``upto`` as delivered or read.

    With ``peer``, a read acknowledgement covers only messages from that user (reading one
    conversation does not mark another one read).
    """

    TYPE: ClassVar[str] = "ack"
    status: str = _field(Kind.STATUS)
    upto: int = _field(Kind.UINT)
    peer: str | None = _field(Kind.IDENT, optional=True)


@attrs.frozen
class LastSeenQuery(Frame):
    """Ask for ``user``'s last seen; answered with a :class:`Presence` frame."""

    TYPE: ClassVar[str] = "lastseen"
    user: str = _field(Kind.IDENT)


@attrs.frozen
class Subscribe(Frame):
    """Watch the presence of ``users``; each gets a :class:`Presence` frame now and on change."""

    TYPE: ClassVar[str] = "subscribe"
    users: list[str] = _field(Kind.IDENTS)


@attrs.frozen
class Unsubscribe(Frame):
    """Stop watching the presence of ``users``."""

    TYPE: ClassVar[str] = "unsubscribe"
    users: list[str] = _field(Kind.IDENTS)


# -- server -> client -------------------------------------------------------------------


@attrs.frozen
class Welcome(Frame):
    """Answer to a good :class:`Hello`: the chosen version and the limits in force."""

    TYPE: ClassVar[str] = "welcome"
    version: int = _field(Kind.UINT)
    user: str = _field(Kind.IDENT)
    session: str = _field(Kind.IDENT)
    ts: int = _field(Kind.UINT)
    max_frame: int = _field(Kind.UINT)
    max_body: int = _field(Kind.UINT)


@attrs.frozen
class Sent(Frame):
    """The message ``id`` is accepted and queued for its recipient (state SENT)."""

    TYPE: ClassVar[str] = "sent"
    id: str = _field(Kind.IDENT)
    ts: int = _field(Kind.UINT)
    dup: bool = _field(Kind.BOOL, optional=True, default=False)


@attrs.frozen
class Msg(Frame):
    """A message for the connected user; acknowledge it by ``seq``."""

    TYPE: ClassVar[str] = "msg"
    seq: int = _field(Kind.UINT)
    id: str = _field(Kind.IDENT)
    sender: str = _field(Kind.IDENT, wire="from")
    body: str = _field(Kind.TEXT)
    ts: int = _field(Kind.UINT)


@attrs.frozen
class Receipt(Frame):
    """User ``by`` has reached ``status`` for the messages ``ids`` that the client sent."""

    TYPE: ClassVar[str] = "receipt"
    seq: int = _field(Kind.UINT)
    status: str = _field(Kind.STATUS)
    by: str = _field(Kind.IDENT)
    ids: list[str] = _field(Kind.IDENTS)
    ts: int = _field(Kind.UINT)


@attrs.frozen
class Presence(Frame):
    """``user`` is online, or was last seen at ``last_seen`` (ms; absent if never seen)."""

    TYPE: ClassVar[str] = "presence"
    user: str = _field(Kind.IDENT)
    online: bool = _field(Kind.BOOL)
    last_seen: int | None = _field(Kind.UINT, optional=True)
    #: Version 2: the frame comes from a subscription (its first state or a change), not
    #: as the answer to a ``lastseen``.
    watch: bool = _field(Kind.BOOL, optional=True, default=False, since=2)


@attrs.frozen
class Synced(Frame):
    """Version 2: the backlog streamed after the welcome is complete.

    Every item queued for the user before the session opened has been sent; what follows
    arrives as it is queued. ``seq`` is the highest sequence number sent so far (or, if
    nothing was sent, the number below which nothing more will come).
    """

    TYPE: ClassVar[str] = "synced"
    SINCE: ClassVar[int] = 2
    seq: int = _field(Kind.UINT)


@attrs.frozen
class Error(Frame):
    """A request failed or the connection is about to close; ``code`` is stable."""

    TYPE: ClassVar[str] = "error"
    code: str = _field(Kind.IDENT)
    message: str = _field(Kind.TEXT)
    ref: str | None = _field(Kind.IDENT, optional=True)


ClientFrame = Hello | Send | Ack | LastSeenQuery | Subscribe | Unsubscribe
ServerFrame = Welcome | Sent | Msg | Receipt | Presence | Synced | Error

CLIENT_FRAMES: dict[str, type[Frame]] = {
    cls.TYPE: cls for cls in (Hello, Send, Ack, LastSeenQuery, Subscribe, Unsubscribe)
}
SERVER_FRAMES: dict[str, type[Frame]] = {
    cls.TYPE: cls for cls in (Welcome, Sent, Msg, Receipt, Presence, Synced, Error)
}
#: Every frame type, client frames first; each class's ``INDEX`` is its position here.
FRAMES: tuple[type[Frame], ...] = (*CLIENT_FRAMES.values(), *SERVER_FRAMES.values())
for _index, _cls in enumerate(FRAMES):
    _cls.INDEX = _index
