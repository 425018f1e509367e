"""Tests for the server's RFC 6455 layer, :mod:`chatd.protocol.websocket`, with no sockets.

Everything here is synchronous, in wsproto's style: client frames are built by hand, byte
by byte, and fed to a :class:`FrameReader`; upgrade requests are fed to
:func:`accept_handshake`. The file has three parts:

* the frame layer: masking, fragmentation, control frames, reserved bits and opcodes,
  lengths, the size limit, UTF-8 (also across fragments), close frames, pings and pongs,
  and how errors are reported;
* the upgrade handshake: the request line, the headers (missing, invalid, repeated), the
  size limit, and partial requests;
* a Hypothesis differential test: the same client byte stream, valid or not, cut into
  random reads, is fed to chatd's reader and to wsproto's server connection (the reference
  parser), and both must see the same messages, pings, pongs and close, or fail with the
  same close code. Where wsproto departs from RFC 6455 the test follows the RFC; each
  departure is listed at :func:`rfc_wsproto`.

The file is over 500 lines because it tests one module and its parts share one frame
builder (:func:`frame`); the differential part builds its streams with it too.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import (
    CloseReason,
    FrameProtocol,
    MessageDecoder,
    ParseFailed,
)

from chatd.protocol import websocket as ws
from chatd.protocol.websocket import (
    MAX_REQUEST_BYTES,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameReader,
    HandshakeError,
    WebSocketError,
    accept_handshake,
)

MASK = b"\x9a\x3c\x05\xe1"
LIMIT = 1 << 20
"""The reader's ``max_message`` in the unit tests, unless a test is about the limit."""


# -- helpers -----------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          mask: bytes | None = MASK, length_bytes: int | None = None) -> bytes:
    """One client frame, built from the RFC 6455 §5.2 layout.

    Args:
        opcode: The 4-bit opcode, reserved ones included.
        payload: The unmasked payload.
        fin: The FIN bit.
        rsv: The three RSV bits, as a number from 0 to 7.
        mask: The masking key; None sends the payload unmasked, with the MASK bit clear.
        length_bytes: How many extended length bytes to use (0, 2 or 8); None: the fewest.

    Returns:
        The frame's bytes.
    """
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    first = fin << 7 | rsv << 4 | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length_bytes == 0:
        head = bytes((first, mask_bit | size))
    else:
        indicator = 126 if length_bytes == 2 else 127
        head = bytes((first, mask_bit | indicator)) + size.to_bytes(length_bytes, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """A close frame's payload: the 2-byte code and the reason's bytes."""
    return code.to_bytes(2, "big") + reason


def feed_all(reader: FrameReader, data: bytes, step: int | None = None) -> list[ws.Event]:
    """Feed ``data`` at once, or ``step`` bytes at a time, and return every event."""
    step = step or max(1, len(data))
    events: list[ws.Event] = []
    for index in range(0, len(data), step):
        events += reader.feed(data[index:index + step])
    return events


def refused(reader: FrameReader, data: bytes) -> int:
    """Feed ``data``, which must raise at once; return the close code."""
    with pytest.raises(WebSocketError) as info:
        reader.feed(data)
    return info.value.code


# -- masking, messages and fragmentation -------------------------------------------------


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_unmasking_in_c_agrees_with_the_python_fallback(payload: bytes, mask: bytes) -> None:
    assert ws._apply_mask is not None  # the test extras install websockets with speedups
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert ws._unmask(bytearray(payload), mask) == expected
    assert ws._xor(bytearray(payload), mask) == expected


def test_masked_binary_and_text_messages_are_unmasked() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_BINARY, b"\x00\x01hello")) == [ws.Message(b"\x00\x01hello")]
    assert reader.feed(frame(OP_TEXT, "h\u00e9llo \u20ac".encode())) == [
        ws.Message("h\u00e9llo \u20ac")]
    assert reader.feed(frame(OP_BINARY)) == [ws.Message(b"")]
    assert reader.feed(frame(OP_TEXT)) == [ws.Message("")]


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_CONTINUATION, OP_PING, OP_CLOSE])
def test_unmasked_client_frame_is_refused_1002(opcode: int) -> None:
    assert refused(FrameReader(LIMIT), frame(opcode, b"hi", mask=None)) == 1002


def test_unmasked_frame_is_refused_from_its_two_byte_header() -> None:
    assert refused(FrameReader(LIMIT), frame(OP_BINARY, b"x" * 300, mask=None)[:2]) == 1002


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_every_length_encoding_is_read(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert FrameReader(LIMIT).feed(frame(OP_BINARY, payload)) == [ws.Message(payload)]


def test_frames_split_at_every_byte_give_the_same_events() -> None:
    stream = (frame(OP_BINARY, b"one") + frame(OP_PING, b"p") + frame(OP_TEXT, b"two")
              + frame(OP_BINARY, b"x" * 200) + frame(OP_PONG))
    expected = [ws.Message(b"one"), ws.Ping(b"p"), ws.Message("two"),
                ws.Message(b"x" * 200), ws.Pong(b"")]
    assert feed_all(FrameReader(LIMIT), stream) == expected
    assert feed_all(FrameReader(LIMIT), stream, step=1) == expected
    for cut in range(len(stream) + 1):
        reader = FrameReader(LIMIT)
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == expected


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
def test_fragmented_message_is_reassembled(opcode: int) -> None:
    parts = [b"ab", b"", b"cde", b"f"]
    stream = b"".join(frame(OP_CONTINUATION if i else opcode, part, fin=i == len(parts) - 1)
                      for i, part in enumerate(parts))
    data = b"abcdef" if opcode == OP_BINARY else "abcdef"
    assert feed_all(FrameReader(LIMIT), stream) == [ws.Message(data)]
    assert feed_all(FrameReader(LIMIT), stream, step=1) == [ws.Message(data)]


def test_control_frames_in_the_middle_of_fragments_come_out_at_once() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_BINARY, b"he", fin=False)) == []
    assert reader.feed(frame(OP_PING, b"1")) == [ws.Ping(b"1")]
    assert reader.feed(frame(OP_CONTINUATION, b"ll", fin=False) + frame(OP_PONG, b"2")) == [
        ws.Pong(b"2")]
    assert reader.feed(frame(OP_CONTINUATION, b"o")) == [ws.Message(b"hello")]


def test_close_in_the_middle_of_fragments_is_a_close() -> None:
    reader = FrameReader(LIMIT)
    stream = frame(OP_TEXT, b"he", fin=False) + frame(OP_CLOSE, close_payload(1001))
    assert reader.feed(stream) == [Close(1001, "")]


def test_continuation_outside_a_message_is_refused_1002() -> None:
    assert refused(FrameReader(LIMIT), frame(OP_CONTINUATION, b"x")) == 1002


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
def test_new_message_before_the_last_one_finished_is_refused_1002(opcode: int) -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_BINARY, b"a", fin=False)) == []
    assert refused(reader, frame(opcode, b"b")) == 1002


# -- control frames, reserved bits and opcodes, lengths ----------------------------------


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes_is_refused_1002(opcode: int) -> None:
    assert refused(FrameReader(LIMIT), frame(opcode, b"x" * 126)) == 1002


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_with_an_extended_length_is_refused_from_its_header(opcode: int) -> None:
    """A control frame's 7-bit length of 126 or 127 already says it is too long."""
    assert refused(FrameReader(LIMIT), frame(opcode, b"x" * 126)[:2]) == 1002
    assert refused(FrameReader(LIMIT), frame(opcode, b"x" * 5, length_bytes=8)[:2]) == 1002


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_is_refused_1002(opcode: int) -> None:
    assert refused(FrameReader(LIMIT), frame(opcode, b"x", fin=False)[:2]) == 1002


def test_control_frame_of_125_bytes_is_accepted() -> None:
    payload = bytes(range(125))
    assert FrameReader(LIMIT).feed(frame(OP_PING, payload)) == [ws.Ping(payload)]


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_CONTINUATION, OP_PING])
def test_reserved_bits_are_refused_1002_from_the_header(rsv: int, opcode: int) -> None:
    assert refused(FrameReader(LIMIT), frame(opcode, b"abc", rsv=rsv)[:2]) == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcode_is_refused_1002_as_soon_as_the_header_arrives(opcode: int) -> None:
    """Only the 2-byte header is fed: the refusal must not wait for the mask or payload."""
    assert refused(FrameReader(LIMIT), frame(opcode, b"abc")[:2]) == 1002


@pytest.mark.parametrize("opcode", [3, 11])
def test_reserved_opcode_with_a_long_payload_is_refused_from_the_header(opcode: int) -> None:
    assert refused(FrameReader(LIMIT), frame(opcode, b"x" * 70000)[:2]) == 1002


@pytest.mark.parametrize(("size", "length_bytes"), [(0, 2), (125, 2), (0, 8), (65535, 8)])
def test_length_not_minimally_encoded_is_refused_1002(size: int, length_bytes: int) -> None:
    data = frame(OP_BINARY, b"x" * size, length_bytes=length_bytes)
    assert refused(FrameReader(LIMIT), data[:2 + length_bytes]) == 1002


def test_length_with_the_top_bit_set_is_refused_1002() -> None:
    header = b"\x82\xff" + (1 << 63 | 70000).to_bytes(8, "big")
    assert refused(FrameReader(1 << 64), header) == 1002


def test_incomplete_frame_waits_for_more() -> None:
    reader = FrameReader(LIMIT)
    data = frame(OP_BINARY, b"x" * 70000)
    for cut in (1, 2, 5, 9, 10, 13, 14, 1000, len(data) - 1):
        assert FrameReader(LIMIT).feed(data[:cut]) == []
    assert reader.feed(data[:14]) == []
    assert reader.feed(data[14:]) == [ws.Message(b"x" * 70000)]


# -- the size limit ----------------------------------------------------------------------


def test_message_of_exactly_the_limit_is_accepted() -> None:
    assert FrameReader(100).feed(frame(OP_BINARY, b"x" * 100)) == [ws.Message(b"x" * 100)]


@pytest.mark.parametrize("size", [101, 126, 70000])
def test_oversize_message_is_refused_1009_from_its_header(size: int) -> None:
    data = frame(OP_BINARY, b"x" * size)
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert refused(FrameReader(100), data[:header]) == 1009


def test_header_claiming_2_63_bytes_is_refused_1009() -> None:
    assert refused(FrameReader(LIMIT), b"\x82\xff" + (2**63 - 1).to_bytes(8, "big")) == 1009


def test_fragments_adding_up_over_the_limit_are_refused_1009() -> None:
    reader = FrameReader(100)
    assert reader.feed(frame(OP_BINARY, b"x" * 60, fin=False)) == []
    assert reader.feed(frame(OP_PING, b"y" * 100)) == [ws.Ping(b"y" * 100)]  # not counted
    assert refused(reader, frame(OP_CONTINUATION, b"x" * 41)[:2]) == 1009


def test_limit_counts_each_message_afresh() -> None:
    reader = FrameReader(100)
    one = frame(OP_BINARY, b"x" * 60, fin=False) + frame(OP_CONTINUATION, b"x" * 40)
    assert feed_all(reader, one * 3) == [ws.Message(b"x" * 100)] * 3


# -- UTF-8 -------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\xff", b"abc\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf",
                                     b"\xf4\x90\x80\x80", b"truncated \xe2\x82"])
def test_text_that_is_not_utf8_is_refused_1007(payload: bytes) -> None:
    assert refused(FrameReader(LIMIT), frame(OP_TEXT, payload)) == 1007


@pytest.mark.parametrize("first", [b"\xff", b"ok \xc3\x28", b"\xf4\x90", b"\xed\xa0",
                                   b"\xed\xbf", b"\xe0\x80"])
def test_invalid_utf8_is_refused_1007_at_the_first_fragment(first: bytes) -> None:
    """The first fragment can never become UTF-8: refused before the final one arrives."""
    reader = FrameReader(LIMIT)
    assert refused(reader, frame(OP_TEXT, first, fin=False)) == 1007
    with pytest.raises(WebSocketError):
        reader.feed(frame(OP_CONTINUATION, b"a"))


def test_invalid_utf8_is_refused_1007_at_the_fragment_that_makes_it_invalid() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_TEXT, b"ok \xe2\x82", fin=False)) == []  # may become a euro
    assert refused(reader, frame(OP_CONTINUATION, b"(", fin=False)) == 1007


@pytest.mark.parametrize("cuts", [(1,), (2,), (1, 2), (1, 2, 3), (3,)])
def test_multibyte_character_split_across_fragments_is_accepted(cuts: tuple[int, ...]) -> None:
    text = "\U0001f600"  # four bytes in UTF-8
    data = text.encode()
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    reader = FrameReader(LIMIT)
    for i, piece in enumerate(pieces[:-1]):
        assert reader.feed(frame(OP_CONTINUATION if i else OP_TEXT, piece, fin=False)) == []
    assert reader.feed(frame(OP_CONTINUATION, pieces[-1])) == [ws.Message(text)]


def test_text_ending_inside_a_character_is_refused_1007_at_its_last_fragment() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_TEXT, b"abc\xf0\x9f", fin=False)) == []
    assert refused(reader, frame(OP_CONTINUATION, b"\x98")) == 1007


def test_binary_fragments_are_not_checked_as_utf8() -> None:
    stream = frame(OP_BINARY, b"\xff\xed\xa0", fin=False) + frame(OP_CONTINUATION, b"\xc0")
    assert FrameReader(LIMIT).feed(stream) == [ws.Message(b"\xff\xed\xa0\xc0")]


# -- close frames ------------------------------------------------------------------------


def test_close_without_payload_is_1005() -> None:
    assert FrameReader(LIMIT).feed(frame(OP_CLOSE)) == [Close(1005, "")]


def test_close_with_a_one_byte_payload_is_refused_1002() -> None:
    assert refused(FrameReader(LIMIT), frame(OP_CLOSE, b"\x03")) == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_code_is_accepted(code: int) -> None:
    """RFC 6455 §7.4 and the IANA registry: 1012-1014 too (a client may well retry on
    them, as chatd's own client library does)."""
    data = frame(OP_CLOSE, close_payload(code, "bye \u00e9".encode()))
    assert FrameReader(LIMIT).feed(data) == [Close(code, "bye \u00e9")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_invalid_close_code_is_refused_1002(code: int) -> None:
    """Unassigned codes, and 1004-1006 and 1015, which must never be sent."""
    assert refused(FrameReader(LIMIT), frame(OP_CLOSE, close_payload(code))) == 1002


def test_close_reason_that_is_not_utf8_is_refused_1007() -> None:
    assert refused(FrameReader(LIMIT), frame(OP_CLOSE, close_payload(1000, b"\xff"))) == 1007


def test_nothing_after_a_close_counts() -> None:
    reader = FrameReader(LIMIT)
    stream = frame(OP_CLOSE, close_payload(1000)) + frame(OP_BINARY, b"late") + b"\xff\xff"
    assert reader.feed(stream) == [Close(1000, "")]


def test_nothing_after_a_close_counts_in_later_reads_either() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(frame(OP_PING) + frame(OP_CLOSE)[:1]) == [ws.Ping(b"")]
    assert reader.feed(frame(OP_CLOSE)[1:]) == [Close(1005, "")]
    assert reader.feed(frame(OP_BINARY, b"late")) == []
    assert reader.feed(b"\xff\xff garbage") == []
    assert reader.error is None


# -- pings and pongs ---------------------------------------------------------------------


def test_ping_and_pong_carry_their_payload() -> None:
    stream = frame(OP_PING) + frame(OP_PING, b"\x00ping") + frame(OP_PONG, b"pong")
    assert FrameReader(LIMIT).feed(stream) == [ws.Ping(b""), ws.Ping(b"\x00ping"),
                                                ws.Pong(b"pong")]


def test_ping_payload_is_bytes_even_when_it_arrives_in_pieces() -> None:
    events = feed_all(FrameReader(LIMIT), frame(OP_PING, b"abc"), step=1)
    assert events == [ws.Ping(b"abc")]
    assert isinstance(events[0], ws.Ping)
    assert type(events[0].payload) is bytes


# -- how errors are reported -------------------------------------------------------------


def test_events_before_an_error_come_first_and_the_error_is_sticky() -> None:
    reader = FrameReader(LIMIT)
    stream = frame(OP_BINARY, b"ok") + frame(OP_PING) + frame(3, b"bad") + frame(OP_BINARY)
    assert reader.feed(stream) == [ws.Message(b"ok"), ws.Ping(b"")]
    assert reader.error is not None and reader.error.code == 1002
    assert refused(reader, b"") == 1002
    assert refused(reader, frame(OP_BINARY, b"more")) == 1002


def test_large_message_in_small_reads_allocates_in_proportion_to_its_size() -> None:
    """The receive buffer grows in place: a read allocates about its own size, not the
    size of everything buffered, so a large message in many reads costs O(n), not O(n²).

    Measured in bytes allocated (tracemalloc's peak during each read), never in time.
    """
    size = 1 << 18
    data = frame(OP_BINARY, bytes(size))
    reads = [data[i:i + 512] for i in range(0, len(data), 512)]
    reader = FrameReader(size)
    allocated = 0
    tracemalloc.start()
    try:
        for chunk in reads[:-1]:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            assert reader.feed(chunk) == []
            allocated += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert reader.feed(reads[-1]) == [ws.Message(bytes(size))]
    assert allocated < 4 * size, f"{allocated} bytes allocated for a {size}-byte message"


# -- the upgrade handshake ---------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""The key and accept value of RFC 6455 §1.3's example."""

HEADERS = (("Host", "server.example.com"), ("Upgrade", "websocket"),
           ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY),
           ("Sec-WebSocket-Version", "13"))


def upgrade(line: str = "GET /chat HTTP/1.1", *, drop: tuple[str, ...] = (),
            replace: dict[str, str] | None = None,
            extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An upgrade request: RFC 6455's example, with headers dropped, replaced or added.

    Args:
        line: The request line.
        drop: Names of the example's headers to leave out.
        replace: New values for some of the example's headers.
        extra: Header lines to add at the end, as (name, value).

    Returns:
        The request's bytes, up to and including the empty line.
    """
    replace = replace or {}
    headers = [(name, replace.get(name, value)) for name, value in HEADERS
               if name not in drop]
    lines = [line, *(f"{name}: {value}" for name, value in (*headers, *extra))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def handshake_refused(data: bytes) -> HandshakeError:
    """Feed ``data``, which must be refused; return the error."""
    with pytest.raises(HandshakeError) as info:
        accept_handshake(data)
    return info.value


def test_valid_handshake_is_answered_101_with_the_accept_value() -> None:
    request = upgrade()
    result = accept_handshake(request + frame(OP_BINARY, b"early"))
    assert result is not None
    response, used = result
    assert used == len(request)
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: " + ACCEPT + b"\r\n" in response
    assert b"\r\nUpgrade: websocket\r\n" in response
    assert b"\r\nConnection: Upgrade\r\n" in response
    assert response.endswith(b"\r\n\r\n")


def test_accept_value_is_the_rfc_digest_of_any_key() -> None:
    key = base64.b64encode(bytes(range(16))).decode()
    result = accept_handshake(upgrade(replace={"Sec-WebSocket-Key": key}))
    assert result is not None
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n" in result[0]


def test_header_names_are_case_insensitive_and_tokens_are_lists() -> None:
    request = upgrade(drop=("Upgrade", "Connection"), extra=(
        ("uPgRaDe", "WebSocket"), ("CONNECTION", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Extensions", "permessage-deflate")))
    assert accept_handshake(request) is not None


def test_list_headers_may_be_repeated() -> None:
    """Connection and Upgrade are comma-separated lists (RFC 9110 §5.3): repeated lines
    are one list."""
    request = upgrade(drop=("Upgrade", "Connection"), extra=(
        ("Connection", "keep-alive"), ("Connection", "Upgrade"),
        ("Upgrade", "h2c"), ("Upgrade", "websocket")))
    assert accept_handshake(request) is not None


def test_partial_request_returns_none() -> None:
    request = upgrade()
    for cut in range(len(request)):
        assert accept_handshake(request[:cut]) is None


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.2", "HTTP/1.9"])
def test_http_1_1_and_later_are_accepted(version: str) -> None:
    """RFC 6455 §4.2.1: an HTTP/1.1 or higher GET request."""
    assert accept_handshake(upgrade(f"GET /chat {version}")) is not None


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x",
                                     "HTTP/1.", "HTTP/11", "HTTPS/1.1", "http/1.1"])
def test_http_1_0_and_other_versions_are_refused_400(version: str) -> None:
    assert handshake_refused(upgrade(f"GET /chat {version}")).status == 400


@pytest.mark.parametrize("line", ["POST /chat HTTP/1.1", "GET /chat", "GET  /chat HTTP/1.1",
                                  "GET /chat HTTP/1.1 extra", "get /chat HTTP/1.1"])
def test_malformed_or_non_get_request_line_is_refused_400(line: str) -> None:
    assert handshake_refused(upgrade(line)).status == 400


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x00", b"POST", b"PUT /", b"H"])
def test_other_protocols_are_refused_from_their_first_bytes(data: bytes) -> None:
    assert handshake_refused(data).status == 400


@pytest.mark.parametrize("name", ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key"])
def test_missing_header_is_refused_400(name: str) -> None:
    assert handshake_refused(upgrade(drop=(name,))).status == 400


@pytest.mark.parametrize(("name", "value"), [
    ("Upgrade", "h2c"), ("Connection", "keep-alive"), ("Sec-WebSocket-Key", "short"),
    ("Sec-WebSocket-Key", "not base64 at all!!!!!!"),
    ("Sec-WebSocket-Key", base64.b64encode(bytes(15)).decode()),
    ("Sec-WebSocket-Key", base64.b64encode(bytes(17)).decode()),
])
def test_invalid_header_value_is_refused_400(name: str, value: str) -> None:
    assert handshake_refused(upgrade(replace={name: value})).status == 400


@pytest.mark.parametrize("version", [None, "8", "14", "13, 8", ""])
def test_other_websocket_version_is_refused_426_naming_13(version: str | None) -> None:
    request = (upgrade(drop=("Sec-WebSocket-Version",)) if version is None
               else upgrade(replace={"Sec-WebSocket-Version": version}))
    err = handshake_refused(request)
    assert err.status == 426
    assert err.response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in err.response


@pytest.mark.parametrize(("name", "value"), [
    ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA=="),
    ("Sec-WebSocket-Version", "13"), ("Host", "server.example.com"), ("host", "evil.example"),
])
def test_header_that_must_be_single_is_refused_400_when_repeated(name: str,
                                                                 value: str) -> None:
    """RFC 6455 §11.3.1 and §11.3.5 (the key and the version) and RFC 9112 §3.2 (Host)."""
    err = handshake_refused(upgrade(extra=((name, value),)))
    assert err.status == 400
    assert "more than once" in str(err)
    assert err.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("line", ["NoColon", ": no name", "Name : space before colon",
                                  " folded: line", "\tfolded: line"])
def test_malformed_header_line_is_refused_400(line: str) -> None:
    request = upgrade().replace(b"\r\nHost:", f"\r\n{line}\r\nHost:".encode(), 1)
    assert handshake_refused(request).status == 400


def test_request_of_exactly_the_size_limit_is_accepted() -> None:
    base = upgrade(extra=(("X-Pad", ""),))
    padded = upgrade(extra=(("X-Pad", "a" * (MAX_REQUEST_BYTES - len(base))),))
    assert len(padded) == MAX_REQUEST_BYTES
    assert accept_handshake(padded) is not None


def test_request_over_the_size_limit_is_refused_400() -> None:
    base = upgrade(extra=(("X-Pad", ""),))
    padded = upgrade(extra=(("X-Pad", "a" * (MAX_REQUEST_BYTES + 1 - len(base))),))
    assert handshake_refused(padded).status == 400


def test_unfinished_request_over_the_size_limit_is_refused_before_it_ends() -> None:
    data = upgrade()[:-4] + b"\r\nX-Pad: " + b"a" * MAX_REQUEST_BYTES
    assert handshake_refused(data).status == 400
    assert accept_handshake(data[:MAX_REQUEST_BYTES]) is None


def test_refusal_is_a_complete_http_response() -> None:
    err = handshake_refused(upgrade(drop=("Host",)))
    head, _, body = err.response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head


# -- differential test against wsproto ---------------------------------------------------

#: Close codes wsproto wrongly refuses: assigned in the IANA registry that RFC 6455 §7.4.2
#: defers to for 1000-2999 (1014: Bad Gateway).
IANA_CODES_WSPROTO_LACKS = {1014: CloseReason.INTERNAL_ERROR}


@contextmanager
def rfc_wsproto() -> Iterator[None]:
    """Make wsproto follow RFC 6455 where it departs from it, for the differential test.

    The departures, each corrected here and nowhere else:

    * Close code 1014 (Bad Gateway, in the IANA registry RFC 6455 §7.4.2 defers to) is
      refused by wsproto as an unknown reserved code, because its ``CloseReason`` lacks
      it. Corrected by checking such a close frame as if it carried 1011 (valid, with the
      same reason rules), then reporting the real code.
    * A text fragment ending in ``ED A0``-``ED BF`` (the start of a UTF-16 surrogate,
      which no byte can complete into UTF-8) is refused by wsproto only when the next byte
      arrives, possibly after control frames or a close, because Python's incremental
      UTF-8 decoder keeps such a prefix pending. RFC 6455 §8.1 and chatd refuse a text
      message as soon as it cannot be UTF-8. Corrected by refusing such a pending prefix
      at once.

    Both corrections replace methods of wsproto's own (``_process_close`` is private),
    which is why pyproject.toml keeps wsproto below its next major version.

    Yields:
        Nothing; wsproto is patched while the context is open.
    """
    process_close = FrameProtocol._process_close
    process_frame = MessageDecoder.process_frame

    def rfc_process_close(self: FrameProtocol, parsed: Any) -> Any:
        code = int.from_bytes(parsed.payload[:2], "big")
        if len(parsed.payload) < 2 or code not in IANA_CODES_WSPROTO_LACKS:
            return process_close(self, parsed)
        stand_in = IANA_CODES_WSPROTO_LACKS[code].to_bytes(2, "big") + parsed.payload[2:]
        checked = process_close(self, parsed._replace(payload=stand_in))
        return checked._replace(payload=(code, checked.payload[1]))

    def rfc_process_frame(self: MessageDecoder, parsed: Any) -> Any:
        result = process_frame(self, parsed)
        if self.decoder is not None:  # a text message goes on
            pending = self.decoder.getstate()[0]
            if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0":
                raise ParseFailed("surrogate in text", CloseReason.INVALID_FRAME_PAYLOAD_DATA)
        return result

    with (mock.patch.object(FrameProtocol, "_process_close", rfc_process_close),
          mock.patch.object(MessageDecoder, "process_frame", rfc_process_frame)):
        yield


#: Byte sequences that make text interesting for a UTF-8 checker: valid characters of
#: every length, each split in two, and sequences that can never be UTF-8.
UTF8_PIECES = (b"a", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xc3", b"\xa9",
               b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xff", b"\xc0\xaf",
               b"\xed\xa0", b"\xed\xa0\x80", b"\xf4\x90", b"\xe0\x80", b"\x80")
#: Close codes: every kind of valid and invalid one, besides random ones.
CLOSE_CODES = (0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010,
               1011, 1012, 1013, 1014, 1015, 1016, 2999, 3000, 3999, 4000, 4999, 5000)


@st.composite
def wire_frame(draw: st.DrawFn, opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One frame carrying ``payload``, usually well-formed, sometimes not: RSV bits,
    no mask, a longer length encoding than needed, or a FIN bit cleared on a control
    frame."""
    if opcode >= 8:
        fin = draw(st.sampled_from([True] * 29 + [False]))
    flaw = draw(st.sampled_from(["none"] * 45 + ["rsv", "unmasked", "long_length"]))
    mask = draw(st.binary(min_size=4, max_size=4))
    rsv = draw(st.integers(1, 7)) if flaw == "rsv" else 0
    length_bytes = None
    if flaw == "long_length":
        length_bytes = draw(st.sampled_from([2, 8] if len(payload) < 126 else [8]))
    return frame(opcode, payload, fin=fin, rsv=rsv,
                 mask=None if flaw == "unmasked" else mask, length_bytes=length_bytes)


@st.composite
def text_bytes(draw: st.DrawFn) -> bytes:
    """A text payload: valid UTF-8, or UTF-8 with awkward or invalid pieces in it."""
    if draw(st.booleans()):
        return draw(st.text(max_size=20)).encode()
    return b"".join(draw(st.lists(st.sampled_from(UTF8_PIECES), max_size=8)))


@st.composite
def data_message(draw: st.DrawFn) -> list[bytes]:
    """A text or binary message in one to four fragments, maybe with control frames
    between them, maybe large enough for a 2- or 8-byte length."""
    text = draw(st.booleans())
    size = draw(st.sampled_from(["small"] * 8 + ["medium", "large"]))
    if size == "small":
        payload = draw(text_bytes()) if text else draw(st.binary(max_size=40))
    else:
        payload = b"a" * (draw(st.integers(126, 400)) if size == "medium"
                          else draw(st.integers(65536, 66000)))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    bounds = [0, *cuts, len(payload)]
    frames: list[bytes] = []
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        opcode = OP_CONTINUATION if index else OP_TEXT if text else OP_BINARY
        last = index == len(bounds) - 2
        frames.append(draw(wire_frame(opcode, payload[start:stop], last)))
        if not last and draw(st.integers(0, 3)) == 0:
            frames.append(draw(control_frame()))
    return frames


@st.composite
def control_frame(draw: st.DrawFn) -> bytes:
    """A ping, pong or close; its payload sometimes too long, a close's sometimes bad."""
    opcode = draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE]))
    if opcode != OP_CLOSE:
        long = draw(st.integers(0, 9)) == 0
        payload = draw(st.binary(min_size=120, max_size=130) if long else st.binary(max_size=20))
    else:
        shape = draw(st.sampled_from(["empty", "one_byte", "code", "code", "code"]))
        if shape == "empty":
            payload = b""
        elif shape == "one_byte":
            payload = draw(st.binary(min_size=1, max_size=1))
        else:
            code = draw(st.sampled_from(CLOSE_CODES) | st.integers(0, 65535))
            payload = close_payload(code, draw(text_bytes()))
    return draw(wire_frame(opcode, payload))


@st.composite
def odd_frame(draw: st.DrawFn) -> bytes:
    """A frame with any opcode, reserved ones included, or a stray continuation."""
    opcode = draw(st.integers(0, 15))
    return draw(wire_frame(opcode, draw(st.binary(max_size=20)), draw(st.booleans())))


@st.composite
def client_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream of client frames, and the same bytes cut into reads at random points."""
    # Of ten parts, six are data messages, three control frames and one an odd frame.
    kinds = draw(st.lists(st.integers(0, 9), max_size=6))
    parts = [draw(data_message() if kind < 6 else st.builds(list, st.tuples(
        control_frame() if kind < 9 else odd_frame()))) for kind in kinds]
    stream = b"".join(itertools.chain.from_iterable(parts))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reads = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    return stream, reads


Outcome = tuple[list[tuple[Any, ...]], int | None]
"""What a parser made of a stream: its events, then the close code of its error, if any."""


def chatd_outcome(reads: list[bytes]) -> Outcome:
    """Feed ``reads`` to chatd's reader, with no size limit to speak of."""
    reader = FrameReader(1 << 63)
    events: list[tuple[Any, ...]] = []
    for data in reads:
        try:
            new = reader.feed(data)
        except WebSocketError as err:
            return events, err.code
        for event in new:
            match event:
                case ws.Message(data=str() as text):
                    events.append(("text", text))
                case ws.Message(data=bytes() as binary):
                    events.append(("binary", binary))
                case ws.Ping(payload=payload):
                    events.append(("ping", payload))
                case ws.Pong(payload=payload):
                    events.append(("pong", payload))
                case Close(code=code, reason=reason):
                    events.append(("close", code, reason))
        if reader.error is not None:
            return events, reader.error.code
    return events, None


#: An upgrade request that wsproto's server accepts.
WSPROTO_REQUEST = (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode()
                   + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def wsproto_outcome(reads: list[bytes]) -> Outcome:
    """Feed ``reads`` to an open wsproto server connection, pieces of messages joined."""
    conn = WSConnection(ConnectionType.SERVER)
    conn.receive_data(WSPROTO_REQUEST)
    assert any(isinstance(event, Request) for event in conn.events())
    conn.send(AcceptConnection())
    events: list[tuple[Any, ...]] = []
    pieces: list[Any] = []
    for data in reads:
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, Message):
                pieces.append(event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        events.append(("text", "".join(pieces)))
                    else:
                        assert isinstance(event, BytesMessage)
                        events.append(("binary", b"".join(bytes(p) for p in pieces)))
                    pieces = []
            elif isinstance(event, Ping):
                events.append(("ping", bytes(event.payload)))
            elif isinstance(event, Pong):
                events.append(("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if conn.state is not ConnectionState.REMOTE_CLOSING:  # a parse failure
                    return events, int(event.code)
                events.append(("close", int(event.code), event.reason or ""))
                return events, None
    return events, None


@settings(max_examples=500, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(client_stream())
def test_chatd_and_wsproto_agree_on_any_client_stream(
        stream_and_reads: tuple[bytes, list[bytes]]) -> None:
    stream, reads = stream_and_reads
    with rfc_wsproto():
        expected = wsproto_outcome(reads)
    assert chatd_outcome(reads) == expected
    assert chatd_outcome([stream]) == expected  # however the stream is cut


def test_differential_setup_reports_errors_and_closes_apart() -> None:
    """The harness itself: wsproto's parse failures and peer closes are told apart."""
    closed = [frame(OP_BINARY, b"ok") + frame(OP_CLOSE, close_payload(1000, b"bye"))]
    assert wsproto_outcome(closed) == ([("binary", b"ok"), ("close", 1000, "bye")], None)
    assert wsproto_outcome([frame(OP_CLOSE, close_payload(1004))]) == ([], 1002)
    with rfc_wsproto():
        assert wsproto_outcome([frame(OP_CLOSE, close_payload(1014))]) == (
            [("close", 1014, "")], None)
        assert wsproto_outcome([frame(OP_CLOSE, close_payload(1014, b"\xff"))]) == ([], 1007)
        assert wsproto_outcome([frame(OP_TEXT, b"\xed\xa0", fin=False)
                                + frame(OP_PING)]) == ([], 1007)
    assert wsproto_outcome([frame(OP_TEXT, b"\xed\xa0", fin=False) + frame(OP_PING)]) == (
        [("ping", b"")], None)
