"""Hostile input against a running node, over real sockets.

Every test plays an attacker against a real node and checks three things:

1. the daemon's answer: the ``error`` code and/or the WebSocket close code the attacker sees;
2. bystanders: a well-behaved pair (carol and erin, through :func:`chatd.client.connect`),
   connected before the attack, still exchange messages afterwards;
3. the store: the messages carol queued for offline dave before the attack are all still
   there afterwards, and nothing else was added (no frame of a refused message was acted
   on), and dave receives them when he connects.

:func:`guarded` does 2 and 3 around an attack. The "one bad message, one answer" cases are
a table (:data:`BAD_MESSAGES`), each sent as the first message of a connection, as the
first message after a good ``hello``, and in the same message as a good ``hello``.

No test sleeps and hopes: waits are on frames or server-side conditions under
``trio.fail_after``; where time must pass, the node is configured with short timeouts.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import cbor2
import pytest
import trio
from conftest import RunningNode
from test_node import (
    TIMEOUT,
    Frame,
    MakeNode,
    Peer,
    RawClient,
    decode,
    encode,
    exchange,
    hello,
    jwt,
    login,
    raw_connect,
    raw_login,
    until,
)
from trio_websocket import ConnectionClosed, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from chatd.protocol import Error, Sent

#: Messages carol queues for offline dave before each attack.
DAVE_IDS = ("d1", "d2", "d3")
#: Seconds a test waits for the answer to a bad message or connection before it fails. It is
#: a generous deadline, not a measurement: what shows that the node refused at once is how it
#: refused (a refusal that waited would end another way: 4408 after ``auth_timeout``, or no
#: 400 before the handshake timeout), or that the node closed although the rest of what a
#: hostile header claims was never sent.
QUICK = 10.0


# -- helpers ---------------------------------------------------------------------------------


def queued(node: RunningNode, user: str) -> int:
    """How many items wait in ``user``'s queue in the node's store."""
    return node.node.backend.store.queued(user)  # type: ignore[attr-defined, no-any-return]


@asynccontextmanager
async def guarded(node: RunningNode) -> AsyncIterator[tuple[Peer, Peer]]:
    """Bystanders around an attack: check after it that nothing was harmed.

    Before the body runs, carol and erin connect and carol queues :data:`DAVE_IDS` for
    offline dave. After it, carol and erin exchange a message each way, dave's queue holds
    exactly those messages, and dave, connecting, receives them all.
    """
    async with login(node, "carol") as carol, login(node, "erin") as erin:
        for msg_id in DAVE_IDS:
            await carol.client.send("dave", f"body of {msg_id}", id=msg_id)
        assert queued(node, "dave") == len(DAVE_IDS)
        yield carol, erin
        await exchange(carol, erin)
        assert carol.client.closed is None and erin.client.closed is None
    assert queued(node, "dave") == len(DAVE_IDS)
    async with login(node, "dave") as dave:
        msgs = await dave.msgs(len(DAVE_IDS))
        assert [(m.id, m.sender, m.body) for m in msgs] == [
            (msg_id, "carol", f"body of {msg_id}") for msg_id in DAVE_IDS]


def send(body: object = "hi", **extra: object) -> Frame:
    """A send frame to dave (so that one acted on would show in dave's queue)."""
    return {"t": "send", "id": "evil", "to": "dave", "body": body, **extra}


def send_with_raw_body(body: bytes) -> bytes:
    """A send frame to dave whose ``body`` value is the raw CBOR ``body``."""
    head = cbor2.dumps({"t": "send", "id": "evil", "to": "dave"})
    return bytes([head[0] + 1]) + head[1:] + cbor2.dumps("body") + body


def nested(header: bytes, depth: int) -> bytes:
    """``depth`` one-entry containers, one inside the other, around a 0."""
    return header * depth + b"\x00"


# -- one bad message, one answer -------------------------------------------------------------

FIRST = "first"  # the first message of the connection, no hello at all
AFTER_HELLO = "after_hello"  # the first message after the welcome
WITH_HELLO = "with_hello"  # in the same message as a good hello, after it
EVERYWHERE = (FIRST, AFTER_HELLO, WITH_HELLO)


@attrs.frozen
class Bad:
    """A hostile message, where it is sent, and the answer it must get."""

    name: str
    payload: bytes | str
    code: str | None  # the error frame's code; None: a close without an error frame
    close: int
    where: tuple[str, ...] = EVERYWHERE


_INDEFINITE_SEND = b"\xbf" + cbor2.dumps(send())[1:] + b"\xff"

BAD_MESSAGES = [
    # 1. not CBOR at all, or CBOR that is not well-formed
    Bad("non_cbor", b"\xff\xfe\xfd\x00junk", "bad_cbor", 4400),
    Bad("truncated_frame", cbor2.dumps(send())[:-1], "bad_cbor", 4400),
    Bad("good_send_then_garbage", encode(send()) + b"\xff", "bad_cbor", 4400),
    Bad("tagged_send", b"\xd9\xd9\xf7" + encode(send()), "bad_cbor", 4400),
    Bad("duplicate_key", b"\xa5" + cbor2.dumps(send())[1:] + b"\x62id\x62m2", "bad_cbor", 4400),
    # 2. a text WebSocket message
    Bad("text_message", '{"t": "send"}', "text_frame", 1003, (FIRST, AFTER_HELLO)),
    # 3. headers that claim absurd lengths, with nothing (or far too little) behind them
    Bad("array_2^32", b"\x9a\xff\xff\xff\xff", "bad_cbor", 4400),
    Bad("array_2^64-1", b"\x9b" + b"\xff" * 8, "bad_cbor", 4400),
    Bad("map_2^64-1", b"\xbb" + b"\xff" * 8, "bad_cbor", 4400),
    Bad("bytes_2^32", b"\x5a\xff\xff\xff\xff", "bad_cbor", 4400),
    Bad("bytes_2^64-1", b"\x5b" + b"\xff" * 8, "bad_cbor", 4400),
    Bad("text_2^32", b"\x7a\xff\xff\xff\xff", "bad_cbor", 4400),
    Bad("text_2^64-1", b"\x7b" + b"\xff" * 8, "bad_cbor", 4400),
    Bad("text_2^32_then_60KB", b"\x7a\xff\xff\xff\xff" + b"a" * 60000, "bad_cbor", 4400),
    Bad("body_2^64-1", send_with_raw_body(b"\x7b" + b"\xff" * 8), "bad_cbor", 4400),
    # 4. nesting
    Bad("arrays_60000_deep", nested(b"\x81", 60000), "too_deep", 4400),
    Bad("maps_20000_deep", nested(b"\xa1\x61a", 20000), "too_deep", 4400),
    Bad("arrays_100000_deep", nested(b"\x81", 100000), None, 1009),
    Bad("body_5_deep", send_with_raw_body(nested(b"\x81", 4)), "too_deep", 4400),
    # 5. indefinite lengths
    Bad("indefinite_array", b"\x9f\x00\xff", "bad_cbor", 4400),
    Bad("indefinite_map_send", _INDEFINITE_SEND, "bad_cbor", 4400),
    Bad("indefinite_text_body", send_with_raw_body(b"\x7f\x62hi\xff"), "bad_cbor", 4400),
    Bad("indefinite_bytes_body", send_with_raw_body(b"\x5f\x41h\xff"), "bad_cbor", 4400),
    Bad("indefinite_text_30000_chunks", b"\x7f" + b"\x61a" * 30000 + b"\xff", "bad_cbor",
        4400),
    Bad("indefinite_arrays_30000_deep", b"\x9f" * 30000 + b"\xff" * 30000, "bad_cbor", 4400),
    Bad("indefinite_arrays_60000_open", b"\x9f" * 60000, "bad_cbor", 4400),
    Bad("indefinite_maps_15000_deep", b"\xbf\x61a" * 15000 + b"\x00" + b"\xff" * 15000,
        "bad_cbor", 4400),
    # 6. strings over max_string_bytes (16384)
    Bad("body_16385_bytes", encode(send("x" * 16385)), "string_too_long", 4400),
    Bad("body_60KB", encode(send("x" * 60000)), "string_too_long", 4400),
    Bad("body_16386_bytes_8193_chars", encode(send("\u00e9" * 8193)), "string_too_long", 4400),
    Bad("key_16385_bytes", encode(send(**{"k" * 16385: 1})), "string_too_long", 4400),
    Bad("bytes_16385", encode(send(b"x" * 16385)), "string_too_long", 4400),
    Bad("token_60KB", encode(hello("x" * 60000)), "string_too_long", 4400, (FIRST,)),
    # too many frames or items
    Bad("129_frames", encode(*[{"t": "lastseen", "user": "dave"}] * 129), "too_many_frames",
        4400),
    Bad("1025_subscriptions", encode({"t": "subscribe", "users": ["u"] * 1025}),
        "too_many_items", 4400),
    # 7. types and fields
    Bad("unknown_type", encode({"t": "shout", "to": "dave"}), "unknown_type", 4400),
    Bad("server_type", encode({"t": "welcome", "version": 1}), "unknown_type", 4400),
    Bad("integer_type", encode({"t": 7}), "unknown_type", 4400),
    Bad("unknown_field", encode(send(priority=1)), "unknown_field", 4400),
    Bad("send_as_bob_from_field", encode(send(**{"from": "bob"})), "unknown_field", 4400),
    Bad("null_body", encode(send(None)), "missing_field", 4400),
    Bad("negative_upto", encode({"t": "ack", "status": "read", "upto": -1}), "bad_field",
        4400),
    # 8. frames out of order
    Bad("send_before_hello", encode(send()), "hello_required", 4400, (FIRST,)),
    Bad("second_hello", encode(hello("x")), "already_authenticated", 4400,
        (AFTER_HELLO, WITH_HELLO)),
    # 9. over max_frame_bytes: the WebSocket layer closes at once, no error frame
    Bad("oversized_65537", b"\x00" * 65537, None, 1009),
]


def _bad_params() -> list[object]:
    return [pytest.param(bad, where, id=f"{bad.name}-{where}")
            for bad in BAD_MESSAGES for where in bad.where]


def test_bad_message_names_are_unique() -> None:
    names = [bad.name for bad in BAD_MESSAGES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("bad", "where"), _bad_params())
async def test_bad_message_closes_only_that_connection(make_node: MakeNode, bad: Bad,
                                                       where: str) -> None:
    node = await make_node()
    async with guarded(node):
        async with raw_connect(node.url) as raw:
            payload = bad.payload
            if where == AFTER_HELLO:
                await raw.send(hello(node.token("mallory")))
                await raw.expect("welcome", user="mallory")
            elif where == WITH_HELLO:
                assert isinstance(payload, bytes)
                payload = encode(hello(node.token("mallory"))) + payload
            try:
                await raw.ws.send_message(payload)
            except ConnectionClosed as exc:  # refused on its header while still sending
                frames, close = [], exc.reason.code
            else:
                frames, close = await raw.read_to_close(timeout=QUICK)
        assert close == bad.close, (close, frames)
        assert [f.get("code") for f in frames] == ([bad.code] if bad.code else [])
        await until(lambda: "mallory" not in node.node.registry.local)


# -- 10. a flood from one user ---------------------------------------------------------------


async def test_flood_is_throttled_nothing_dropped_and_others_keep_their_latency(
        make_node: MakeNode) -> None:
    rate, burst, total = 50.0, 128, 400
    node = await make_node(rate_limit=rate, rate_burst=burst)
    ids = [f"f{i}" for i in range(total)]
    async with guarded(node) as (carol, erin), login(node, "mallory") as mallory:
        flood_over = trio.Event()
        round_trips: list[float] = []

        async def bystanders() -> None:
            while not flood_over.is_set():
                start = trio.current_time()
                with trio.fail_after(2.0):
                    await exchange(carol, erin)
                round_trips.append(trio.current_time() - start)
                await trio.sleep(0.2)  # pacing, so that the round trips span the flood

        sent: list[str] = []
        limited: list[float] = []
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystanders)
            for first in range(0, total, 10):  # 40 messages of 10 sends, pipelined
                await mallory.client.submit([(i, "sink", "flood") for i in ids[first:first + 10]])
            with trio.fail_after((total - burst) / rate + 5):
                while len(sent) < total:
                    event = await mallory.next(Sent | Error)  # type: ignore[arg-type]
                    if isinstance(event, Error):
                        assert event.code == "rate_limited", event
                        limited.append(trio.current_time())
                    else:
                        sent.append(event.id)
            elapsed = trio.current_time() - start
            flood_over.set()

        assert sent == ids  # every send was processed, in order, none dropped
        assert queued(node, "sink") == total
        assert elapsed >= (total - burst) / rate - 0.5  # the budget did hold the flood back
        assert limited, "the flooder was never told rate_limited"
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(limited))  # at most ~1/s
        assert len(round_trips) >= 10 and max(round_trips) < 2.0
        # Not fatal: the flooder's connection is still usable.
        assert (await mallory.client.last_seen("carol")).online is True
        assert mallory.client.closed is None


async def test_frames_sent_with_the_hello_count_against_the_budget(
        make_node: MakeNode) -> None:
    node = await make_node(rate_limit=100.0, rate_burst=128)
    query = {"t": "lastseen", "user": "dave"}
    async with guarded(node), raw_connect(node.url, queue=64) as raw:
        await raw.send(hello(node.token("mallory")), *[query] * 127)  # 127 of 128 spent
        await raw.expect("welcome")
        await raw.send(*[query] * 128)  # the budget holds ~1: this one is over it
        frames = [await raw.frame() for _ in range(2 * 127 + 1)]
        assert [f.get("code") for f in frames if f["t"] == "error"] == ["rate_limited"]


async def test_client_paused_for_its_budget_is_not_taken_for_idle(make_node: MakeNode) -> None:
    # A valid configuration in which one paused 128-frame message (1.28 s) outlasts
    # idle_timeout (0.5 s); with the defaults that takes rate_limit < 128/60 frames/s.
    node = await make_node(rate_limit=100.0, rate_burst=128, ping_interval=0.2,
                           idle_timeout=0.5)
    query = {"t": "lastseen", "user": "dave"}
    async with guarded(node), raw_login(node, "mallory") as raw:
        for _ in range(4):  # the budget covers the first; the others wait their turn
            await raw.send(*[query] * 128)
        answers, errors = 0, set()
        with trio.fail_after(10):
            while answers < 4 * 128:
                frame = await raw.frame()
                if frame["t"] == "error":
                    errors.add(frame["code"])
                else:
                    answers += 1
        assert errors == {"rate_limited"}


# -- 11. connections that never finish opening -----------------------------------------------

#: A complete WebSocket upgrade request (RFC 6455 section 1.3).
UPGRADE = (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def host_port(node: RunningNode) -> tuple[str, int]:
    """The node's listening address."""
    host, port = node.url.removeprefix("ws://").rsplit(":", 1)
    return host, int(port)


async def until_eof(stream: trio.SocketStream, data: bytes = b"", every: float | None = None
                    ) -> bytes:
    """Send ``data`` (at once, or a byte every ``every`` seconds) while reading until the
    server ends the connection. Returns everything the server sent."""
    received = bytearray()

    async def sender() -> None:
        step = max(1, len(data)) if every is None else 1
        for index in range(0, len(data), step):
            try:
                await stream.send_all(data[index:index + step])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if every is not None:
                await trio.sleep(every)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        try:
            while chunk := await stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass  # a reset ends the connection too
        nursery.cancel_scope.cancel()
    return bytes(received)


@pytest.mark.parametrize(("drip", "connections"), [
    pytest.param(b"", 20, id="silent_x20"),
    pytest.param(UPGRADE[:40], 1, id="half_request"),
    pytest.param(UPGRADE, 1, id="slowloris_byte_every_200ms"),
])
async def test_unfinished_websocket_handshake_is_dropped(
        make_node: MakeNode, drip: bytes, connections: int) -> None:
    timeout = 0.5
    node = await make_node(handshake_timeout=timeout)
    async with guarded(node):
        streams = [await trio.open_tcp_stream(*host_port(node)) for _ in range(connections)]
        start = trio.current_time()
        with trio.fail_after(timeout + 2):
            async with trio.open_nursery() as nursery:
                answers: list[bytes] = []

                async def watch(stream: trio.SocketStream) -> None:
                    async with stream:
                        answers.append(await until_eof(stream, drip, every=0.2))

                for stream in streams:
                    nursery.start_soon(watch, stream)
        elapsed = trio.current_time() - start
        assert answers == [b""] * connections  # closed without an HTTP response
        assert timeout - 0.1 <= elapsed < timeout + 1.0


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1_000_000 + b"\r\n\r\n",
                 id="1MB_header"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100_000 + b"\r\n",
                 id="100000_headers"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="plain_http_get"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 160,
                 id="tls_client_hello"),
])
async def test_bad_handshake_request_is_answered_400_at_once(make_node: MakeNode,
                                                            request_bytes: bytes) -> None:
    node = await make_node()
    async with guarded(node), await trio.open_tcp_stream(*host_port(node)) as stream:
        with trio.fail_after(QUICK):
            answer = await until_eof(stream, request_bytes)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]


class WireClient:
    """A WebSocket client on a bare TCP stream, for what trio-websocket will not send:
    a message in slow fragments, or a frame header that lies about its length."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(cls, node: RunningNode) -> AsyncIterator[WireClient]:
        """Open a TCP connection and complete the WebSocket handshake."""
        host, port = host_port(node)
        async with await trio.open_tcp_stream(host, port) as stream:
            client = cls(stream)
            await stream.send_all(client.ws.send(Request(host=host, target="/")))
            with trio.fail_after(TIMEOUT):
                while not any(isinstance(e, AcceptConnection) for e in client.ws.events()):
                    client.ws.receive_data(await stream.receive_some())
            yield client

    async def send_fragments(self, data: bytes, every: float) -> None:
        """Send ``data`` as one binary message, a one-byte fragment every ``every`` s."""
        for index in range(len(data)):
            last = index == len(data) - 1
            event = BytesMessage(data=data[index:index + 1], message_finished=last)
            try:
                await self.stream.send_all(self.ws.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(every)

    async def read_to_close(self, timeout: float = TIMEOUT) -> tuple[list[Frame], int | None]:
        """Every frame until the server closes, and the close code (None: no close frame)."""
        frames: list[Frame] = []
        parts: list[bytes] = []
        with trio.fail_after(timeout):
            while True:
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        parts.append(bytes(event.data))
                        if event.message_finished:
                            frames.extend(decode(b"".join(parts)))
                            parts = []
                    elif isinstance(event, CloseConnection):
                        return frames, event.code
                try:
                    data = await self.stream.receive_some()
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return frames, None
                self.ws.receive_data(data)


def lying_header(length: int, mask: bytes = b"\x00\x00\x00\x00") -> bytes:
    """A masked binary frame header (FIN set) that claims ``length`` payload bytes."""
    return b"\x82\xff" + length.to_bytes(8, "big") + mask


async def test_no_hello_is_closed_4408_after_auth_timeout(make_node: MakeNode) -> None:
    node = await make_node(auth_timeout=0.5)
    async with guarded(node), raw_connect(node.url) as raw:
        start = trio.current_time()
        frames, close = await raw.read_to_close()
        assert (close, [f.get("code") for f in frames]) == (4408, ["auth_timeout"])
        assert 0.4 <= trio.current_time() - start < 1.5


async def test_hello_that_never_ends_is_closed_4408_after_auth_timeout(
        make_node: MakeNode) -> None:
    node = await make_node(auth_timeout=0.5)
    async with guarded(node), WireClient.connect(node) as wire:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire.send_fragments, encode(hello(node.token("mallory"))), 0.1)
            frames, close = await wire.read_to_close()
            nursery.cancel_scope.cancel()
        assert (close, [f.get("code") for f in frames]) == (4408, ["auth_timeout"])
        assert 0.4 <= trio.current_time() - start < 1.5
        assert "mallory" not in node.node.registry.local


async def test_header_claiming_2_63_bytes_is_closed_1009_at_once(make_node: MakeNode) -> None:
    node = await make_node(auth_timeout=5)
    async with guarded(node), WireClient.connect(node) as wire:
        await wire.stream.send_all(lying_header(2**63 - 1) + b"\xa3\x61t\x65hello")
        with trio.fail_after(QUICK):
            frames, close = await wire.read_to_close()
        assert (close, frames) == (1009, [])
        assert "mallory" not in node.node.registry.local


@pytest.mark.parametrize("after_hello", [False, True], ids=["first", "after_hello"])
async def test_frame_header_claiming_2_63_bytes_is_closed_1009_once_over_the_limit(
        make_node: MakeNode, after_hello: bool) -> None:
    node = await make_node()
    async with guarded(node), WireClient.connect(node) as wire:
        if after_hello:
            await wire.stream.send_all(wire.ws.send(BytesMessage(
                data=encode(hello(node.token("mallory"))))))
        await wire.stream.send_all(lying_header(2**63 - 1) + b"\x00" * 70000)
        with trio.fail_after(QUICK):  # the other 2**63 bytes are never sent
            frames, close = await wire.read_to_close()
        assert close == 1009
        assert [f["t"] for f in frames] == (["welcome"] if after_hello else [])


# -- 12. many unauthenticated connections from one address -------------------------------------


@asynccontextmanager
async def raw_connect_from(node: RunningNode, source: str) -> AsyncIterator[RawClient]:
    """Like :func:`raw_connect`, from the loopback address ``source`` (e.g. 127.0.0.2)."""
    host, port = host_port(node)
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, port))
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, trio.SocketStream(sock), host, "/")
        try:
            yield RawClient(ws)
        finally:
            await ws.aclose()


async def refused(node: RunningNode) -> None:
    """A new connection from 127.0.0.1 is refused: too_many_connections, 4429, at once."""
    async with raw_connect(node.url) as raw:
        frames, close = await raw.read_to_close(timeout=QUICK)
        assert (close, [f.get("code") for f in frames]) == (4429, ["too_many_connections"])


async def accepted(raw: RawClient, node: RunningNode, user: str) -> None:
    """``raw`` was accepted: its hello gets a welcome."""
    await raw.send(hello(node.token(user)))
    await raw.expect("welcome", user=user)


async def test_unauthenticated_connections_per_address_are_capped(make_node: MakeNode) -> None:
    node = await make_node(max_unauthenticated_per_address=5)
    listener = node.node.listener
    assert listener is not None
    async with guarded(node), AsyncExitStack() as stack:
        waiting = [await stack.enter_async_context(raw_connect(node.url)) for _ in range(5)]
        for _ in range(3):  # refused connections take no slot: each extra one is refused
            await refused(node)

        # Another address is not affected.
        async with raw_connect_from(node, "127.0.0.2") as other:
            await accepted(other, node, "other")

        # One of the five authenticates: room for exactly one more.
        await accepted(waiting[0], node, "mallory0")
        late = [await stack.enter_async_context(raw_connect(node.url))]
        await refused(node)

        # One of the five goes away: its slot is freed once the server notices.
        sessions = listener.live_sessions
        await waiting[1].ws.aclose()
        await until(lambda: listener.live_sessions == sessions - 1)
        late.append(await stack.enter_async_context(raw_connect(node.url)))
        await refused(node)

        # One breaks the protocol before its hello: its slot is freed too.
        await waiting[2].ws.send_message(b"\xff")
        await waiting[2].expect_close(4400, "bad_cbor")
        await until(lambda: listener.live_sessions == sessions - 1)
        late.append(await stack.enter_async_context(raw_connect(node.url)))
        await refused(node)

        # The late ones were served: each was counted (above) and can log in.
        for index, raw in enumerate(late):
            await accepted(raw, node, f"late{index}")

        # The authenticated ones were never disturbed.
        await waiting[0].send({"t": "lastseen", "user": "late0"})
        presence = await waiting[0].expect("presence", user="late0")
        assert presence["online"] is True


async def test_connections_closed_by_auth_timeout_free_their_slots(make_node: MakeNode) -> None:
    node = await make_node(max_unauthenticated_per_address=2, auth_timeout=0.5)
    async with guarded(node), raw_connect(node.url) as one, raw_connect(node.url) as two:
        await refused(node)
        for raw in (one, two):
            await raw.expect_close(4408, "auth_timeout")
        listener = node.node.listener
        assert listener is not None
        await until(lambda: listener.live_sessions == 2)  # carol and erin
        async with raw_connect(node.url) as fresh:
            await accepted(fresh, node, "fresh")


# -- 13. one user against another ------------------------------------------------------------


async def queue_messages(node: RunningNode, sender: str, to: str, ids: list[str]) -> None:
    """``sender`` connects, sends ``ids`` to ``to`` and leaves."""
    async with login(node, sender) as peer:
        for msg_id in ids:
            await peer.client.send(to, f"body of {msg_id}", id=msg_id)


async def test_alice_cannot_acknowledge_or_read_bobs_queue(make_node: MakeNode) -> None:
    node = await make_node()
    bobs, alices = ["b1", "b2", "b3"], ["a1", "a2"]
    async with guarded(node):
        await queue_messages(node, "frank", "bob", bobs)
        await queue_messages(node, "frank", "alice", alices)
        assert (queued(node, "bob"), queued(node, "alice")) == (3, 2)

        # alice acknowledges everything she can name, for every status and peer, and
        # claims with resume to have processed far more than anyone has.
        huge = 2**63 - 1
        acks = [{"t": "ack", "status": status, "upto": huge, **peer}
                for status in ("delivered", "read") for peer in ({}, {"peer": "frank"},
                                                                  {"peer": "bob"})]
        async with raw_connect(node.url) as raw:
            await raw.send(hello(node.token("alice"), resume=huge), *acks)
            await raw.expect("welcome", user="alice")
            await raw.send(*acks)
            await queue_messages(node, "frank", "alice", ["sentinel"])
            seen: list[str] = []
            while not seen or seen[-1] != "sentinel":
                frame = await raw.frame()
                if frame["t"] == "msg":
                    seen.append(frame["id"])
            await raw.send(*acks)
            await raw.send({"t": "lastseen", "user": "bob"})  # a round trip: acks handled
            await raw.expect("presence", user="bob")
        # resume took alice's own two; she only ever saw her own messages.
        assert seen == ["sentinel"]
        assert queued(node, "alice") == 0
        assert queued(node, "bob") == 3

        async with login(node, "bob") as bob:
            msgs = await bob.msgs(3)
            assert [(m.seq, m.id, m.sender) for m in msgs] == [
                (seq, msg_id, "frank") for seq, msg_id in enumerate(bobs, 1)]


async def test_presence_subscriptions_are_capped_per_session(make_node: MakeNode) -> None:
    node = await make_node(max_subscriptions=5)
    users = [f"u{i}" for i in range(8)]
    async with guarded(node), raw_login(node, "alice") as raw:
        # Too many in one frame: refused as a whole, nothing watched, not fatal.
        await raw.send({"t": "subscribe", "users": users})
        await raw.expect("error", code="too_many_subscriptions")
        # One message of one-user frames: the first five are watched, the rest refused.
        await raw.send(*[{"t": "subscribe", "users": [user]} for user in users])
        frames = [await raw.frame() for _ in range(len(users))]
        assert sorted(f["user"] for f in frames if f["t"] == "presence") == users[:5]
        assert [f["code"] for f in frames if f["t"] == "error"] == [
            "too_many_subscriptions"] * 3
        # Watching the same users again costs nothing; one more still does not fit.
        await raw.send({"t": "subscribe", "users": users[:5]},
                       {"t": "subscribe", "users": users[5:6]})
        await raw.expect("error", code="too_many_subscriptions")
        # An unsubscribe frees a slot.
        await raw.send({"t": "unsubscribe", "users": users[:1]},
                       {"t": "subscribe", "users": users[5:6]})
        await raw.expect("presence", user=users[5])
        await raw.send({"t": "lastseen", "user": "alice"})
        await raw.expect("presence", user="alice", online=True)


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _tampered(node: RunningNode, index: int) -> str:
    """bob's token with the character at ``index`` of its signature changed."""
    head, claims, signature = node.token("bob").split(".")
    new = "A" if signature[index] != "A" else "B"
    return f"{head}.{claims}.{signature[:index]}{new}{signature[index + 1:]}"


def _last_char_padding_bit(node: RunningNode) -> str:
    """bob's token with the last signature character changed in a padding bit only.

    43 characters carry the 32 signature bytes: the last one holds 4 signature bits and
    2 padding bits, which canonical base64url sets to zero.
    """
    token = node.token("bob")
    return token[:-1] + B64URL[B64URL.index(token[-1]) ^ 1]


def _alg_none(node: RunningNode, signed: bool) -> str:
    claims = {"sub": "bob", "exp": int(time.time()) + 3600}
    return jwt({"alg": "none", "typ": "JWT"}, claims, node.secret if signed else None)


def _bob_claims_alice_signature(node: RunningNode) -> str:
    head, _, signature = node.token("alice").split(".")
    return f"{head}.{node.token('bob').split('.')[1]}.{signature}"


BAD_TOKENS: dict[str, tuple[Callable[[RunningNode], str], str]] = {
    "signature_first_char": (lambda n: _tampered(n, 0), "auth_failed"),
    "signature_middle_char": (lambda n: _tampered(n, 21), "auth_failed"),
    "claims_of_bob_signature_of_alice": (_bob_claims_alice_signature, "auth_failed"),
    "expired": (lambda n: n.token("bob", ttl=-1), "token_expired"),
    "alg_none_unsigned": (lambda n: _alg_none(n, signed=False), "auth_failed"),
    "alg_none_signed": (lambda n: _alg_none(n, signed=True), "auth_failed"),
    "signature_last_char_padding_bit": (_last_char_padding_bit, "auth_failed"),
    "signature_with_base64_padding": (lambda n: n.token("bob") + "=", "auth_failed"),
}

@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_token_is_refused_4401(make_node: MakeNode, case: str) -> None:
    make_token, code = BAD_TOKENS[case]
    node = await make_node()
    async with guarded(node), raw_connect(node.url) as raw:
        await raw.send(hello(make_token(node)), send())
        first = await raw.frame()
        assert (first["t"], first.get("code")) == ("error", code), first
        frames, close = await raw.read_to_close()
        assert (close, frames) == (4401, [])
    assert "bob" not in node.node.registry.local
