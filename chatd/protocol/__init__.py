"""The chatd wire protocol, sans-IO: frames, the CBOR codec, limits and error codes.

Nothing in this package does I/O or imports trio; the server, the client library and the
tests all drive it with bytes. docs/protocol.md is the normative description.
"""

from . import websocket
from ._codec import Codec, Limits, client_codec, server_codec
from ._connection import ClientConnection, ConnectionState, ServerConnection, negotiate
from ._errors import CloseCode, ErrorCode, ProtocolError
from ._frames import (
    CLIENT_FRAMES,
    FRAMES,
    MAX_RECEIPT_IDS,
    PROTOCOL_VERSIONS,
    SERVER_FRAMES,
    Ack,
    AckStatus,
    ClientFrame,
    Error,
    Frame,
    Hello,
    Kind,
    LastSeenQuery,
    Msg,
    Presence,
    Receipt,
    Send,
    Sent,
    ServerFrame,
    Subscribe,
    Synced,
    Unsubscribe,
    Welcome,
)

__all__ = [
    "CLIENT_FRAMES",
    "FRAMES",
    "MAX_RECEIPT_IDS",
    "PROTOCOL_VERSIONS",
    "SERVER_FRAMES",
    "Ack",
    "AckStatus",
    "ClientConnection",
    "ClientFrame",
    "CloseCode",
    "Codec",
    "ConnectionState",
    "Error",
    "ErrorCode",
    "Frame",
    "Hello",
    "Kind",
    "LastSeenQuery",
    "Limits",
    "Msg",
    "Presence",
    "ProtocolError",
    "Receipt",
    "Send",
    "Sent",
    "ServerConnection",
    "ServerFrame",
    "Subscribe",
    "Synced",
    "Unsubscribe",
    "Welcome",
    "client_codec",
    "negotiate",
    "server_codec",
    "websocket",
]
