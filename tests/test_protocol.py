"""Tests for the sans-IO protocol core: frames, the CBOR codec, limits and connections.

Everything here is synchronous, in wsproto's style: tests feed message bytes in, read
frames out, and wire a :class:`ClientConnection` to a :class:`ServerConnection` by hand.
No event loop, sockets or clocks are involved.

The file has five parts:

* round trips of every frame type, with Hypothesis strategies derived from field Kinds;
* fuzzing: whatever bytes arrive, decoding returns frames or raises ProtocolError;
* a table of hostile messages, each with the exact error code (and so close code) expected;
* the connection rules (hello first and once, version negotiation, welcome or error);
* the error code catalogue itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal, NamedTuple

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.protocol import (
    CLIENT_FRAMES,
    PROTOCOL_VERSIONS,
    SERVER_FRAMES,
    Ack,
    ClientConnection,
    CloseCode,
    Codec,
    ConnectionState,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Kind,
    Limits,
    Msg,
    Presence,
    ProtocolError,
    Send,
    Sent,
    ServerConnection,
    Subscribe,
    Welcome,
    client_codec,
    negotiate,
    server_codec,
)

MAX_UINT = 2**63 - 1

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow],
)
"""Settings for the fuzz tests: enough examples to matter, a deadline no CI box misses."""

ROUND_TRIP = settings(max_examples=60, deadline=timedelta(seconds=1))
"""Settings for per-frame-type round trips (run once per frame type)."""


# -- helpers ----------------------------------------------------------------------------


def enc(*items: Any) -> bytes:
    """Encode ``items`` as one message: a CBOR sequence."""
    return b"".join(cbor2.dumps(item) for item in items)


def head(major: int, arg: int) -> bytes:
    """A raw CBOR item head: major type and argument (a length, count, tag or value)."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes([major << 5 | info]) + arg.to_bytes(size, "big")
    raise ValueError(f"{arg} does not fit a CBOR head")


def tag(number: int, inner: bytes) -> bytes:
    """``inner`` (raw CBOR) wrapped in semantic tag ``number``."""
    return head(6, number) + inner


def raw_map(*entries: tuple[str, bytes]) -> bytes:
    """A CBOR map from (text key, raw CBOR value) pairs; keys may repeat."""
    return head(5, len(entries)) + b"".join(cbor2.dumps(k) + v for k, v in entries)


def with_fields(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of the wire map ``base`` with fields changed, added or (``...``) removed."""
    result = {**base, **changes}
    return {k: v for k, v in result.items() if v is not ...}


HELLO: dict[str, Any] = {"t": "hello", "versions": [1], "token": "tok"}
SEND: dict[str, Any] = {"t": "send", "id": "m1", "to": "bob", "body": "hi"}
ACK: dict[str, Any] = {"t": "ack", "status": "read", "upto": 3}
MSG: dict[str, Any] = {"t": "msg", "seq": 1, "id": "m1", "from": "alice", "body": "hi",
                       "ts": 5}
SENT: dict[str, Any] = {"t": "sent", "id": "m1", "ts": 5}
LONG_HELLO = enc(with_fields(HELLO, token="x" * 64))
WELCOME_FRAME = Welcome(version=1, user="alice", session="s1", ts=1, max_frame=65536,
                        max_body=16384)


def fields_of(cls: type[Frame]) -> tuple[Any, ...]:
    """The field declarations of a frame class (attrs keeps them on the class)."""
    fields: tuple[Any, ...] = cls.__attrs_attrs__
    return fields


def wire_key(field: Any) -> str:
    """The wire key a frame field travels under."""
    wire: str | None = field.metadata["wire"]
    return wire or str(field.name)


def expect_error(receive: Callable[[Any], object], data: Any) -> ProtocolError:
    """Feed ``data`` to ``receive`` and return the ProtocolError it must raise."""
    with pytest.raises(ProtocolError) as info:
        receive(data)
    return info.value


def frames_or_protocol_error(receive: Callable[[Any], list[Frame]], data: bytes) -> None:
    """Assert ``receive(data)`` returns at least one frame or raises ProtocolError only."""
    try:
        frames = receive(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert frames
    assert all(isinstance(frame, Frame) for frame in frames)


def open_pair() -> tuple[ClientConnection, ServerConnection]:
    """A client and a server connection that have completed the opening handshake."""
    client, server = ClientConnection(), ServerConnection()
    server.receive(client.hello("tok"))
    client.receive(server.send([WELCOME_FRAME]))
    assert client.state is server.state is ConnectionState.OPEN
    return client, server


# -- strategies -------------------------------------------------------------------------

idents = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                 max_size=64)
uints = st.integers(0, MAX_UINT)

KIND_STRATEGIES: dict[Kind, st.SearchStrategy[Any]] = {
    Kind.IDENT: idents,
    Kind.TEXT: st.text(max_size=200),  # at most 800 UTF-8 bytes: within default limits
    Kind.UINT: uints,
    Kind.BOOL: st.booleans(),
    Kind.IDENTS: st.lists(idents, max_size=24),
    Kind.UINTS: st.lists(uints, max_size=24),
    Kind.STATUS: st.sampled_from(["delivered", "read"]),
}


def test_every_kind_has_a_strategy() -> None:
    assert set(KIND_STRATEGIES) == set(Kind)


def field_strategy(field: Any) -> st.SearchStrategy[Any]:
    """Values of one frame field: its Kind, plus the default when the field is optional."""
    values = KIND_STRATEGIES[field.metadata["kind"]]
    if field.metadata["optional"]:
        return st.one_of(st.just(field.default), values)
    return values


def frame_strategy(cls: type[Frame]) -> st.SearchStrategy[Frame]:
    """Well-formed frames of type ``cls``, built from the Kinds its fields declare."""
    return st.builds(cls, **{f.name: field_strategy(f) for f in fields_of(cls)})


client_frames = st.one_of([frame_strategy(cls) for cls in CLIENT_FRAMES.values()])
server_frames = st.one_of([frame_strategy(cls) for cls in SERVER_FRAMES.values()])

cbor_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=20) | st.binary(max_size=20))
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)),
    max_leaves=12,
)
"""Arbitrary CBOR-encodable Python values, nested."""

ALL_TYPES = sorted({*CLIENT_FRAMES, *SERVER_FRAMES})
ALL_WIRE_KEYS = sorted({wire_key(f) for cls in (*CLIENT_FRAMES.values(),
                                                 *SERVER_FRAMES.values())
                        for f in fields_of(cls)})

frame_like = st.builds(
    lambda t, fields: {"t": t, **fields},
    st.sampled_from(ALL_TYPES) | cbor_scalars,
    st.dictionaries(st.sampled_from(ALL_WIRE_KEYS),
                    st.one_of(cbor_values, *KIND_STRATEGIES.values()), max_size=7),
)
"""Maps that look like frames (a type tag, known keys) with arbitrary values: schema bait."""


def _mutate(message: bytes, index: int, byte: int, cut: int) -> bytes:
    """Overwrite one byte of a valid message, then truncate it."""
    i = index % len(message)
    return (message[:i] + bytes([byte]) + message[i + 1:])[:cut]


mutated_messages = st.builds(
    _mutate,
    st.lists(client_frames | server_frames, min_size=1, max_size=3).map(
        lambda frames: enc(*(client_codec().to_wire(f) for f in frames))),
    st.integers(0, 10_000),
    st.integers(0, 255),
    st.integers(0, 4_000),
)
"""Valid messages with one byte changed and possibly cut short."""


# -- 1. round trips ---------------------------------------------------------------------


def _round_trip_cases() -> list[Any]:
    cases = [pytest.param(cls, server_codec, id=f"client-{t}")
             for t, cls in CLIENT_FRAMES.items()]
    cases += [pytest.param(cls, client_codec, id=f"server-{t}")
              for t, cls in SERVER_FRAMES.items()]
    return cases


@pytest.mark.parametrize(("cls", "make_codec"), _round_trip_cases())
@ROUND_TRIP
@given(data=st.data())
def test_round_trip_every_frame_type(cls: type[Frame], make_codec: Callable[[], Codec],
                                     data: st.DataObject) -> None:
    frame = data.draw(frame_strategy(cls))
    codec = make_codec()
    message = codec.encode([frame])
    assert codec.decode(message) == [frame]

    wire = cbor2.loads(message)
    assert wire == codec.to_wire(frame)
    assert wire["t"] == cls.TYPE
    for field in fields_of(cls):
        value = getattr(frame, field.name)
        omitted = field.metadata["optional"] and value == field.default
        if omitted:
            assert wire_key(field) not in wire
        else:
            assert wire[wire_key(field)] == value
    assert set(wire) <= {"t", *(wire_key(f) for f in fields_of(cls))}


@ROUND_TRIP
@given(frames=st.lists(client_frames, min_size=1, max_size=8))
def test_client_frames_in_one_message_decode_in_order(frames: list[Frame]) -> None:
    codec = server_codec()
    assert codec.decode(codec.encode(frames)) == frames


@ROUND_TRIP
@given(frames=st.lists(server_frames, min_size=1, max_size=8))
def test_server_frames_in_one_message_decode_in_order(frames: list[Frame]) -> None:
    codec = client_codec()
    assert codec.decode(codec.encode(frames)) == frames


def test_msg_sender_travels_as_from() -> None:
    msg = Msg(seq=7, id="m1", sender="alice", body="hi", ts=42)
    codec = client_codec()
    assert codec.to_wire(msg) == {"t": "msg", "seq": 7, "id": "m1", "from": "alice",
                                  "body": "hi", "ts": 42}
    assert codec.decode(enc(MSG)) == [Msg(seq=1, id="m1", sender="alice", body="hi", ts=5)]
    bad = expect_error(codec.decode, enc(with_fields(MSG, sender="alice", **{"from": ...})))
    assert bad.code is ErrorCode.UNKNOWN_FIELD


def test_optional_fields_at_default_are_omitted_and_null_means_default() -> None:
    codec = client_codec()
    assert codec.to_wire(Sent(id="m1", ts=5)) == SENT
    assert codec.to_wire(Presence(user="bob", online=False)) == {
        "t": "presence", "user": "bob", "online": False}
    assert codec.to_wire(Presence(user="bob", online=False, last_seen=0))["last_seen"] == 0
    assert codec.decode(enc(with_fields(SENT, dup=None))) == [Sent(id="m1", ts=5, dup=False)]
    assert server_codec().to_wire(Hello([1], "tok")) == HELLO
    assert server_codec().decode(enc(with_fields(HELLO, resume=None))) == [Hello([1], "tok", 0)]


def test_limits_are_inclusive_bounds() -> None:
    """Exactly at every limit is allowed; the hostile table shows one past it is not."""
    limits = Limits(max_frame_bytes=200, max_frames=3, max_items=4, max_string_bytes=16)
    codec = server_codec(limits)
    # A 4-key map, a 4-item array, a 16-byte (8-char) string, 3 frames, depth 3.
    frames = [Hello([1, 2], "é" * 8, 5), Subscribe(["a", "b", "c", "d"]), Ack("read", 1)]
    message = codec.encode(frames)
    assert len(message) <= 200
    assert codec.decode(message) == frames
    assert server_codec(Limits(max_frame_bytes=len(LONG_HELLO))).decode(LONG_HELLO)


def test_default_limits_admit_their_maximum() -> None:
    codec = server_codec()
    assert len(codec.decode(enc(*[ACK] * 128))) == 128
    assert codec.decode(enc({"t": "subscribe", "users": ["u"] * 1024}))
    assert codec.decode(enc(with_fields(SEND, body="x" * 16384)))


# -- 2. fuzzing -------------------------------------------------------------------------

SMALL = Limits(max_frame_bytes=256, max_frames=3, max_depth=3, max_items=4,
               max_string_bytes=16)

RECEIVERS: list[Callable[[], Callable[[Any], list[Frame]]]] = [
    lambda: ServerConnection().receive,
    lambda: server_codec().decode,
    lambda: ClientConnection().receive,
    lambda: client_codec().decode,
    lambda: ServerConnection(SMALL).receive,
    lambda: client_codec(SMALL).decode,
]
"""Every way a message is received: both sides, default and small limits, fresh state."""


def check_every_receiver(data: bytes) -> None:
    """Feed ``data`` to each receiver in :data:`RECEIVERS`."""
    for make_receiver in RECEIVERS:
        frames_or_protocol_error(make_receiver(), data)


@FUZZ
@given(data=st.binary(max_size=512) | mutated_messages)
def test_any_bytes_give_frames_or_protocol_error(data: bytes) -> None:
    check_every_receiver(data)


@FUZZ
@given(items=st.lists(cbor_values | frame_like, min_size=1, max_size=3))
def test_any_cbor_values_give_frames_or_protocol_error(items: list[Any]) -> None:
    check_every_receiver(enc(*items))


# -- 3. hostile messages ----------------------------------------------------------------


class Case(NamedTuple):
    """A hostile message and the error it must raise on the receiving side."""

    name: str
    data: bytes | str
    code: ErrorCode
    limits: Limits | None = None
    side: Literal["server", "client"] = "server"


EXPECTED_CLOSE: dict[ErrorCode, int] = {
    ErrorCode.TEXT_FRAME: 1003,
    ErrorCode.FRAME_TOO_LARGE: 1009,
    ErrorCode.UNSUPPORTED_VERSION: 4426,
}
"""Close codes of the errors in the table; every other one there closes with 4400."""

DEEP = Limits(max_frame_bytes=1 << 20)
TINY_STRINGS = Limits(max_string_bytes=16)
FEW_ITEMS = Limits(max_items=4)

CASES: list[Case] = [
    # Not CBOR at all, or not well-formed.
    Case("break byte alone", b"\xff", ErrorCode.BAD_CBOR),
    Case("reserved additional info 28", b"\x1c", ErrorCode.BAD_CBOR),
    Case("truncated map", head(5, 1) + enc("t"), ErrorCode.BAD_CBOR),
    Case("truncated text", enc(HELLO)[:-1], ErrorCode.BAD_CBOR),
    Case("invalid utf-8 in text", raw_map(("t", head(3, 2) + b"\xff\xfe")), ErrorCode.BAD_CBOR),
    Case("garbage after a good frame", enc(HELLO) + b"\xff", ErrorCode.BAD_CBOR),
    Case("json sent as binary", b'{"t": "hello"}', ErrorCode.BAD_CBOR),
    Case("empty message", b"", ErrorCode.BAD_CBOR),
    # Text messages.
    Case("text message", "hello", ErrorCode.TEXT_FRAME),
    Case("text message holding cbor", enc(HELLO).decode("latin-1"), ErrorCode.TEXT_FRAME),
    Case("empty text message", "", ErrorCode.TEXT_FRAME),
    # Declared lengths far beyond the message: must fail fast, not allocate.
    Case("array claims 2**32 items", head(4, 2**32), ErrorCode.BAD_CBOR),
    Case("array claims 2**64-1 items", head(4, 2**64 - 1), ErrorCode.BAD_CBOR),
    Case("map claims 2**32 pairs", head(5, 2**32), ErrorCode.BAD_CBOR),
    Case("map claims 2**64-1 pairs", head(5, 2**64 - 1), ErrorCode.BAD_CBOR),
    Case("bytes claim 2**32", head(2, 2**32), ErrorCode.BAD_CBOR),
    Case("bytes claim 2**64-1", head(2, 2**64 - 1), ErrorCode.BAD_CBOR),
    Case("text claims 2**32", head(3, 2**32), ErrorCode.BAD_CBOR),
    Case("text claims 2**64-1", head(3, 2**64 - 1), ErrorCode.BAD_CBOR),
    Case("field array claims 2**32 items",
         raw_map(("t", enc("hello")), ("versions", head(4, 2**32))), ErrorCode.BAD_CBOR),
    Case("field text claims 2**64-1",
         raw_map(("t", enc("hello")), ("token", head(3, 2**64 - 1))), ErrorCode.BAD_CBOR),
    # Nesting.
    Case("100,000 nested arrays", b"\x81" * 100_000 + b"\x00", ErrorCode.TOO_DEEP, DEEP),
    Case("100,000 nested maps", (head(5, 1) + enc("a")) * 100_000 + enc(0),
         ErrorCode.TOO_DEEP, DEEP),
    Case("100,000 nested arrays, unterminated", b"\x81" * 100_000, ErrorCode.TOO_DEEP, DEEP),
    Case("field nested past max_depth", enc(with_fields(HELLO, versions=[[[1]]])),
         ErrorCode.TOO_DEEP),
    Case("maps nested past max_depth", enc(with_fields(HELLO, token={"a": {"b": {"c": 1}}})),
         ErrorCode.TOO_DEEP),
    # Indefinite lengths.
    Case("indefinite array", b"\x9f\x00\xff", ErrorCode.BAD_CBOR),
    Case("indefinite map", b"\xbf" + enc("t", "hello") + b"\xff", ErrorCode.BAD_CBOR),
    Case("indefinite text", b"\x7f" + enc("ab") + b"\xff", ErrorCode.BAD_CBOR),
    Case("indefinite bytes", b"\x5f" + enc(b"ab") + b"\xff", ErrorCode.BAD_CBOR),
    Case("indefinite array in a field",
         raw_map(("t", enc("hello")), ("versions", b"\x9f\x01\xff"), ("token", enc("x"))),
         ErrorCode.BAD_CBOR),
    # Duplicate keys.
    Case("duplicate type tag", raw_map(("t", enc("hello")), ("t", enc("hello"))),
         ErrorCode.BAD_CBOR),
    Case("duplicate field",
         raw_map(("t", enc("hello")), ("versions", enc([1])), ("token", enc("a")),
                 ("token", enc("b"))),
         ErrorCode.BAD_CBOR),
    # Semantic tags, known to cbor2 or not: all refused.
    Case("tag 0 datetime string", tag(0, enc("2024-01-01T00:00:00Z")), ErrorCode.BAD_CBOR),
    Case("tag 1 epoch time", tag(1, enc(0)), ErrorCode.BAD_CBOR),
    Case("tag 2 bignum", tag(2, enc(b"\x01" + bytes(8))), ErrorCode.BAD_CBOR),
    Case("tag 3 negative bignum", tag(3, enc(b"\x01" + bytes(8))), ErrorCode.BAD_CBOR),
    Case("tag 28/29 self-referencing array", tag(28, head(4, 1) + tag(29, enc(0))),
         ErrorCode.BAD_CBOR),
    Case("tag 29 dangling reference", tag(29, enc(0)), ErrorCode.BAD_CBOR),
    Case("tag 24 embedded cbor", tag(24, enc(enc(HELLO))), ErrorCode.BAD_CBOR),
    Case("tag 258 set", tag(258, enc([1])), ErrorCode.BAD_CBOR),
    Case("tag 55799 self-describe on a good frame", tag(55799, enc(HELLO)), ErrorCode.BAD_CBOR),
    Case("tag 99 unknown", tag(99, enc(HELLO)), ErrorCode.BAD_CBOR),
    Case("tag 1 in a field", raw_map(*[(k, enc(v)) for k, v in HELLO.items()],
                                     ("resume", tag(1, enc(0)))),
         ErrorCode.BAD_CBOR),
    Case("upto 2**64 needs a bignum tag", enc(with_fields(ACK, upto=2**64)), ErrorCode.BAD_CBOR),
    # Frames that are not maps.
    Case("integer frame", enc(0), ErrorCode.NOT_A_MAP),
    Case("array frame", enc([HELLO]), ErrorCode.NOT_A_MAP),
    Case("text frame item", enc("hello"), ErrorCode.NOT_A_MAP),
    Case("null frame", enc(None), ErrorCode.NOT_A_MAP),
    Case("float frame", enc(1.5), ErrorCode.NOT_A_MAP),
    Case("second item not a map", enc(HELLO, 1), ErrorCode.NOT_A_MAP),
    # Type tags.
    Case("missing type tag", enc(with_fields(HELLO, t=...)), ErrorCode.MISSING_FIELD),
    Case("null type tag", enc(with_fields(HELLO, t=None)), ErrorCode.MISSING_FIELD),
    Case("unknown type", enc({"t": "nope"}), ErrorCode.UNKNOWN_TYPE),
    Case("empty type", enc({"t": ""}), ErrorCode.UNKNOWN_TYPE),
    Case("type is case-sensitive", enc(with_fields(HELLO, t="HELLO")), ErrorCode.UNKNOWN_TYPE),
    Case("integer type", enc({"t": 1}), ErrorCode.UNKNOWN_TYPE),
    Case("server frame sent to server", enc(SENT), ErrorCode.UNKNOWN_TYPE),
    Case("client frame sent to client", enc(HELLO), ErrorCode.UNKNOWN_TYPE, side="client"),
    # Fields.
    Case("unknown field", enc(with_fields(HELLO, extra=1)), ErrorCode.UNKNOWN_FIELD),
    Case("attribute name instead of wire key", enc(with_fields(MSG, sender="a")),
         ErrorCode.UNKNOWN_FIELD, side="client"),
    Case("missing token", enc(with_fields(HELLO, token=...)), ErrorCode.MISSING_FIELD),
    Case("null token", enc(with_fields(HELLO, token=None)), ErrorCode.MISSING_FIELD),
    Case("missing body", enc(with_fields(SEND, body=...)), ErrorCode.MISSING_FIELD),
    Case("missing seq", enc(with_fields(MSG, seq=...)), ErrorCode.MISSING_FIELD, side="client"),
    Case("seq negative", enc(with_fields(MSG, seq=-1)), ErrorCode.BAD_FIELD, side="client"),
    Case("seq 2**63", enc(with_fields(MSG, seq=2**63)), ErrorCode.BAD_FIELD, side="client"),
    Case("seq 2**64-1", enc(with_fields(MSG, seq=2**64 - 1)), ErrorCode.BAD_FIELD,
         side="client"),
    Case("seq 2**64", enc(with_fields(MSG, seq=2**64)), ErrorCode.BAD_CBOR, side="client"),
    Case("seq -2**64", enc(with_fields(MSG, seq=-(2**64))), ErrorCode.BAD_FIELD,
         side="client"),
    Case("seq float", enc(with_fields(MSG, seq=1.0)), ErrorCode.BAD_FIELD, side="client"),
    Case("upto negative", enc(with_fields(ACK, upto=-1)), ErrorCode.BAD_FIELD),
    Case("bool where int", enc(with_fields(HELLO, resume=True)), ErrorCode.BAD_FIELD),
    Case("int where bool", enc(with_fields(SENT, dup=1)), ErrorCode.BAD_FIELD, side="client"),
    Case("int where str", enc(with_fields(SEND, to=5)), ErrorCode.BAD_FIELD),
    Case("bytes where str", enc(with_fields(HELLO, token=b"tok")), ErrorCode.BAD_FIELD),
    Case("str where list", enc(with_fields(HELLO, versions="1")), ErrorCode.BAD_FIELD),
    Case("bool in uint list", enc(with_fields(HELLO, versions=[True])), ErrorCode.BAD_FIELD),
    Case("ident with a space", enc(with_fields(SEND, id="a b")), ErrorCode.BAD_FIELD),
    Case("ident of 65 chars", enc(with_fields(SEND, id="x" * 65)), ErrorCode.BAD_FIELD),
    Case("empty ident", enc(with_fields(SEND, to="")), ErrorCode.BAD_FIELD),
    Case("non-ascii ident", enc(with_fields(SEND, to="bjørn")), ErrorCode.BAD_FIELD),
    Case("bad ident in list", enc({"t": "subscribe", "users": ["ok", "not ok"]}),
         ErrorCode.BAD_FIELD),
    Case("status seen", enc(with_fields(ACK, status="seen")), ErrorCode.BAD_FIELD),
    Case("status in capitals", enc(with_fields(ACK, status="READ")), ErrorCode.BAD_FIELD),
    Case("error code with a space", enc({"t": "error", "code": "bad code", "message": ""}),
         ErrorCode.BAD_FIELD, side="client"),
    Case("integer map key", enc({**HELLO, 1: 2}), ErrorCode.BAD_FIELD),
    Case("undefined value", raw_map(("t", b"\xf7")), ErrorCode.BAD_FIELD),
    Case("simple value", raw_map(("t", enc("hello")), ("token", b"\xe0")), ErrorCode.BAD_FIELD),
    # String limits (16 bytes here).
    Case("text over the limit", enc(with_fields(HELLO, token="x" * 17)),
         ErrorCode.STRING_TOO_LONG, TINY_STRINGS),
    Case("9 chars but 18 utf-8 bytes", enc(with_fields(HELLO, token="é" * 9)),
         ErrorCode.STRING_TOO_LONG, TINY_STRINGS),
    Case("5 chars but 20 utf-8 bytes", enc(with_fields(HELLO, token="\U0001f600" * 5)),
         ErrorCode.STRING_TOO_LONG, TINY_STRINGS),
    Case("map key over the limit", enc(with_fields(HELLO, **{"k" * 17: 1})),
         ErrorCode.STRING_TOO_LONG, TINY_STRINGS),
    Case("bytes over the limit", enc(with_fields(HELLO, token=bytes(17))),
         ErrorCode.STRING_TOO_LONG, TINY_STRINGS),
    Case("body over the default limit", enc(with_fields(SEND, body="x" * 16385)),
         ErrorCode.STRING_TOO_LONG),
    # Message size.
    Case("one byte over max_frame_bytes", LONG_HELLO, ErrorCode.FRAME_TOO_LARGE,
         Limits(max_frame_bytes=len(LONG_HELLO) - 1)),
    Case("over the default 64 KiB", bytes(65537), ErrorCode.FRAME_TOO_LARGE),
    Case("oversized text message", "x" * 65537, ErrorCode.TEXT_FRAME),
    # Counts.
    Case("more than max_frames frames", enc(HELLO, ACK, ACK, ACK), ErrorCode.TOO_MANY_FRAMES,
         Limits(max_frames=3)),
    Case("more than the default 128 frames", enc(*[ACK] * 129), ErrorCode.TOO_MANY_FRAMES),
    Case("array over max_items", enc({"t": "subscribe", "users": list("abcde")}),
         ErrorCode.TOO_MANY_ITEMS, FEW_ITEMS),
    Case("map over max_items", enc(with_fields(HELLO, resume=0, extra=1)),
         ErrorCode.TOO_MANY_ITEMS, FEW_ITEMS),
    Case("array over the default 1024 items",
         enc({"t": "subscribe", "users": ["u"] * 1025}), ErrorCode.TOO_MANY_ITEMS),
]


def test_hostile_case_names_are_unique() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_message_is_refused(case: Case) -> None:
    connection: ServerConnection | ClientConnection
    if case.side == "server":
        codec, connection = server_codec(case.limits), ServerConnection(case.limits)
    else:
        codec, connection = client_codec(case.limits), ClientConnection(case.limits)

    for receive in (codec.decode, connection.receive):
        error = expect_error(receive, case.data)
        assert error.code is case.code, error
        assert error.close_code == EXPECTED_CLOSE.get(case.code, CloseCode.PROTOCOL_ERROR)
    assert connection.state is not ConnectionState.OPEN
    if isinstance(connection, ServerConnection):
        assert connection.state is ConnectionState.CLOSED


def test_duplicate_key_named_depth_is_bad_cbor() -> None:
    data = raw_map(("t", enc("hello")), ("depth", enc(1)), ("depth", enc(2)))
    assert expect_error(server_codec().decode, data).code is ErrorCode.BAD_CBOR


# -- 4. connection rules ----------------------------------------------------------------


def test_handshake_then_traffic_both_ways() -> None:
    client, server = ClientConnection(), ServerConnection()
    assert {client.state, server.state} == {ConnectionState.OPENING}

    [hello] = server.receive(client.hello("secret", resume=9))
    assert hello == Hello(list(PROTOCOL_VERSIONS), "secret", 9)
    assert server.state is ConnectionState.OPEN
    assert server.version == max(PROTOCOL_VERSIONS)

    assert client.receive(server.send([WELCOME_FRAME])) == [WELCOME_FRAME]
    assert client.state is ConnectionState.OPEN
    assert client.welcome == WELCOME_FRAME

    send = Send(id="m1", to="bob", body="hi")
    ack = Ack(status="delivered", upto=1, peer="bob")
    assert server.receive(client.send([send, ack])) == [send, ack]
    replies = [Sent(id="m1", ts=5, dup=True), Msg(seq=1, id="m2", sender="bob", body="yo",
                                                   ts=6)]
    assert client.receive(server.send(replies)) == replies


def test_welcome_and_traffic_in_one_message() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive(client.hello("tok"))
    sent = Sent(id="m1", ts=1)
    assert client.receive(server.send([WELCOME_FRAME, sent])) == [WELCOME_FRAME, sent]
    assert client.state is ConnectionState.OPEN


@pytest.mark.parametrize("first", [SEND, ACK, {"t": "subscribe", "users": ["a"]}],
                         ids=lambda frame: frame["t"])
def test_first_frame_must_be_hello(first: dict[str, Any]) -> None:
    server = ServerConnection()
    error = expect_error(server.receive, enc(first, HELLO))
    assert error.code is ErrorCode.HELLO_REQUIRED
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert server.state is ConnectionState.CLOSED


def test_hello_twice_in_one_message() -> None:
    server = ServerConnection()
    error = expect_error(server.receive, enc(HELLO, HELLO))
    assert error.code is ErrorCode.ALREADY_AUTHENTICATED
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert server.state is ConnectionState.CLOSED


@pytest.mark.parametrize("later", [enc(HELLO), enc(SEND, HELLO)], ids=["alone", "after-send"])
def test_hello_again_in_a_later_message(later: bytes) -> None:
    _, server = open_pair()
    error = expect_error(server.receive, later)
    assert error.code is ErrorCode.ALREADY_AUTHENTICATED
    assert server.state is ConnectionState.CLOSED


@pytest.mark.parametrize("versions", [[99], [], [0], [3, 4]])
def test_hello_without_a_common_version(versions: list[int]) -> None:
    server = ServerConnection()
    error = expect_error(server.receive, enc(with_fields(HELLO, versions=versions)))
    assert error.code is ErrorCode.UNSUPPORTED_VERSION
    assert error.close_code == 4426
    assert server.state is ConnectionState.CLOSED


def test_hello_offering_several_versions_negotiates_one() -> None:
    server = ServerConnection()
    server.receive(enc(with_fields(HELLO, versions=[1, 2, 99])))
    assert server.state is ConnectionState.OPEN
    assert server.version == 2


def test_frames_after_hello_in_the_same_message_are_returned() -> None:
    server = ServerConnection()
    frames = server.receive(enc(HELLO, SEND, ACK))
    assert frames == [Hello([1], "tok"), Send("m1", "bob", "hi"), Ack("read", 3)]
    assert server.state is ConnectionState.OPEN


def test_bad_frame_after_hello_refuses_the_whole_message() -> None:
    server = ServerConnection()
    error = expect_error(server.receive, enc(HELLO, with_fields(SEND, id="a b")))
    assert error.code is ErrorCode.BAD_FIELD
    assert server.state is ConnectionState.CLOSED


@pytest.mark.parametrize(("offered", "supported", "chosen"), [
    ([1], (1,), 1),
    ([1, 2, 99], (1,), 1),
    ([1, 2, 3], (2, 3, 4), 3),
    ([5, 3, 1], (1, 3, 5), 5),
    ([2, 2, 1], (1, 2), 2),
])
def test_negotiate_picks_the_highest_common_version(
        offered: list[int], supported: tuple[int, ...], chosen: int) -> None:
    assert negotiate(offered, supported) == chosen


@ROUND_TRIP
@given(offered=st.lists(st.integers(0, 20), max_size=8),
       supported=st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_negotiate_property(offered: list[int], supported: Sequence[int]) -> None:
    common = set(offered) & set(supported)
    if common:
        assert negotiate(offered, supported) == max(common)
    else:
        with pytest.raises(ProtocolError) as info:
            negotiate(offered, supported)
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_negotiate_defaults_to_protocol_versions() -> None:
    assert negotiate([*PROTOCOL_VERSIONS, 10_000]) == max(PROTOCOL_VERSIONS)


def test_client_raises_the_servers_error_code() -> None:
    client = ClientConnection()
    refusal = Error(code=ErrorCode.AUTH_FAILED.value, message="bad token")
    error = expect_error(client.receive, ServerConnection().send([refusal]))
    assert error.code is ErrorCode.AUTH_FAILED
    assert error.message == "bad token"
    assert error.close_code == CloseCode.AUTH_FAILED
    assert client.state is ConnectionState.CLOSED
    assert client.welcome is None


@pytest.mark.parametrize("code", ["no_such_code", "BAD_CBOR", "x" * 64])
def test_client_maps_unknown_error_codes_to_internal(code: str) -> None:
    client = ClientConnection()
    error = expect_error(client.receive, enc({"t": "error", "code": code, "message": "?"}))
    assert error.code is ErrorCode.INTERNAL
    assert error.close_code == CloseCode.INTERNAL_ERROR
    assert client.state is ConnectionState.CLOSED


@pytest.mark.parametrize("first", [MSG, SENT, {"t": "presence", "user": "a", "online": True}],
                         ids=lambda frame: frame["t"])
def test_client_needs_welcome_first(first: dict[str, Any]) -> None:
    client = ClientConnection()
    error = expect_error(client.receive, enc(first, client.codec.to_wire(WELCOME_FRAME)))
    assert error.code is ErrorCode.HELLO_REQUIRED
    assert client.state is not ConnectionState.OPEN
    assert client.welcome is None


def test_client_hello_offers_every_version() -> None:
    [hello] = server_codec().decode(ClientConnection().hello("tok"))
    assert hello == Hello(list(PROTOCOL_VERSIONS), "tok", 0)


def test_error_frames_after_welcome_are_just_frames() -> None:
    client, server = open_pair()
    notice = Error(code="id_conflict", message="dup", ref="m1")
    assert client.receive(server.send([notice])) == [notice]
    assert client.state is ConnectionState.OPEN


# -- 5. the error code catalogue --------------------------------------------------------


def test_error_codes_are_unique_idents() -> None:
    values = [code.value for code in ErrorCode]
    assert len(values) == len(set(values))
    for value in values:
        assert Kind.IDENT.accepts(value), value


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.value)
def test_every_error_code_fits_an_error_frame(code: ErrorCode) -> None:
    frame = Error(code=code.value, message="m", ref="r1")
    assert client_codec().decode(ServerConnection().send([frame])) == [frame]
    error = expect_error(ClientConnection().receive, ServerConnection().send([frame]))
    assert error.code is code


def sendable_close_code(close: int) -> bool:
    """Whether a server may put ``close`` in a close frame (RFC 6455 section 7.4)."""
    reserved = {1004, 1005, 1006}  # never sent on the wire
    return (1000 <= close <= 1011 and close not in reserved) or 4000 <= close <= 4999


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.value)
def test_fatal_close_codes_are_in_valid_ranges(code: ErrorCode) -> None:
    close = ProtocolError(code, "m").close_code
    if close is not None:
        assert sendable_close_code(close), close


def test_every_close_code_is_in_a_valid_range() -> None:
    for close in CloseCode:
        assert sendable_close_code(close), close


def test_protocol_error_carries_code_message_and_ref() -> None:
    error = ProtocolError(ErrorCode.ID_CONFLICT, "reused id", ref="m1")
    assert (error.code, error.message, error.ref) == (ErrorCode.ID_CONFLICT, "reused id", "m1")
    assert error.close_code is None  # answered with an error frame; the connection stays
    assert str(error) == "id_conflict: reused id"
