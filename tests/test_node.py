"""Integration tests: a real node on a loopback port, driven over real WebSockets.

Well-behaved users connect through :func:`chatd.client.connect` (wrapped in
:func:`login`, which reads events strictly one at a time with a deadline). Misbehaving
ones connect with a bare trio-websocket connection (:class:`RawClient`) and send
hand-built CBOR, several frames per message where that matters.

No test sleeps and hopes: every wait is on a frame, an event or a server-side condition,
under ``trio.fail_after``. Where time itself must pass (auth, idle and presence timeouts),
the node is configured with small values through ``make_node``.
"""

from __future__ import annotations

import base64
import collections
import gc
import hashlib
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
import trio
from conftest import RunningNode
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from chatd.actors import Mailbox
from chatd.auth import load_or_create_secret, mint_token
from chatd.client import Client, Closed, Event, connect
from chatd.config import load_config
from chatd.node import Node
from chatd.protocol import Error, Msg, Presence, Receipt
from chatd.session import Session
from chatd.session._writer import Writer
from chatd.transport import WebSocket

TIMEOUT = 5.0
"""Deadline (seconds) for any single wait on the server."""


@pytest.fixture(params=["embedded", "nats"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every node of this module runs on both engines."""
    return str(request.param)

E = TypeVar("E")
MakeNode = Callable[..., Awaitable[RunningNode]]
Frame = dict[str, Any]


# -- helpers: raw connections ------------------------------------------------------------


def encode(*frames: Frame) -> bytes:
    """One WebSocket message carrying ``frames`` as a CBOR sequence."""
    return b"".join(cbor2.dumps(frame) for frame in frames)


def decode(data: bytes | str) -> list[Frame]:
    """The frames of one server message."""
    assert isinstance(data, bytes), f"server sent a text message: {data!r}"
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(fp, read_size=1)
    frames = []
    while fp.tell() < len(data):
        frames.append(decoder.decode())
    return frames


def hello(token: str, *, versions: tuple[int, ...] = (1,), resume: int | None = None) -> Frame:
    """A hello frame."""
    frame: Frame = {"t": "hello", "versions": list(versions), "token": token}
    if resume is not None:
        frame["resume"] = resume
    return frame


class RawClient:
    """A bare WebSocket connection that speaks frames as dicts."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._pending: collections.deque[Frame] = collections.deque()

    async def send(self, *frames: Frame) -> None:
        """Send ``frames`` in one WebSocket message."""
        await self.ws.send_message(encode(*frames))

    async def frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next frame from the server.

        Raises:
            ConnectionClosed: The server closed the connection first.
        """
        with trio.fail_after(timeout):
            while not self._pending:
                self._pending.extend(decode(await self.ws.get_message()))
        return self._pending.popleft()

    async def expect(self, t: str, **fields: Any) -> Frame:
        """The next frame, which must be of type ``t`` and carry ``fields``."""
        frame = await self.frame()
        assert frame["t"] == t, frame
        assert {key: frame.get(key) for key in fields} == fields, frame
        return frame

    async def read_to_close(self, timeout: float = TIMEOUT) -> tuple[list[Frame], int | None]:
        """Every frame until the server closes, and the close code."""
        frames: list[Frame] = []
        with trio.fail_after(timeout):
            try:
                while True:
                    frames.append(await self.frame(timeout))
            except ConnectionClosed as exc:
                return frames, exc.reason.code if exc.reason else None

    async def expect_close(self, code: int, error: str | None = None) -> list[Frame]:
        """Read until the server closes; check the close code and the last error frame."""
        frames, seen = await self.read_to_close()
        assert seen == code, (seen, frames)
        if error is not None:
            assert frames and frames[-1]["t"] == "error", frames
            assert frames[-1]["code"] == error, frames
        return frames


@asynccontextmanager
async def raw_connect(url: str, queue: int = 1) -> AsyncIterator[RawClient]:
    """A bare WebSocket connection to ``url`` (no hello sent).

    ``queue`` is how many server messages trio-websocket buffers before its reader stops
    reading the socket (and so stops answering pings).
    """
    async with open_websocket_url(url, connect_timeout=TIMEOUT, disconnect_timeout=2,
                                  message_queue_size=queue) as ws:
        yield RawClient(ws)


@asynccontextmanager
async def raw_login(node: RunningNode, user: str, *extra: Frame) -> AsyncIterator[RawClient]:
    """A bare connection that sent hello (plus ``extra`` frames in the same message)."""
    async with raw_connect(node.url) as raw:
        await raw.send(hello(node.token(user)), *extra)
        await raw.expect("welcome", user=user)
        yield raw


# -- helpers: client-library connections --------------------------------------------------


class Peer:
    """A client-library connection whose events are read one at a time, with deadlines."""

    def __init__(self, client: Client, events: AsyncIterator[Event]) -> None:
        self.client = client
        self._events = events

    async def next(self, kind: type[E]) -> E:
        """The next event, which must be a ``kind``."""
        with trio.fail_after(TIMEOUT):
            event = await anext(self._events)
        assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
        return event

    async def msgs(self, n: int) -> list[Msg]:
        """The next ``n`` events, all messages."""
        return [await self.next(Msg) for _ in range(n)]

    def backlog(self) -> list[Event]:
        """The events the library has already received and not yet handed over."""
        events: list[Event] = []
        while True:
            try:
                events.append(self.client._events_out.receive_nowait())
            except trio.WouldBlock:
                return events

    async def drain(self) -> tuple[list[Event], Closed]:
        """Every event until the connection ends, and how it ended."""
        events: list[Event] = []
        with trio.fail_after(TIMEOUT):
            async for event in self._events:
                events.append(event)
        assert self.client.closed is not None
        return events, self.client.closed


@asynccontextmanager
async def login(node: RunningNode, user: str, *, resume: int = 0) -> AsyncIterator[Peer]:
    """Connect ``user`` with the client library."""
    async with (connect(node.url, node.token(user), resume=resume, timeout=TIMEOUT) as client,
                aclosing(client.events()) as events):  # type: ignore[type-var]
        yield Peer(client, events)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Return once ``condition()`` holds (server-side state); fail after ``timeout``."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def queued(node: RunningNode, user: str) -> int:
    """How many items wait in ``user``'s queue, read through the backend's queues."""
    queues = node.node.backend.queues
    return len(await queues.pending(user, 0, 1_000_000))


async def exchange(a: Peer, b: Peer) -> None:
    """Check that two connected users can still exchange a message both ways."""
    for sender, recipient in ((a, b), (b, a)):
        sent = await sender.client.send(recipient.client.user, f"to {recipient.client.user}")
        msg = await recipient.next(Msg)
        assert (msg.id, msg.sender) == (sent.id, sender.client.user)


def b64url(data: bytes) -> str:
    """Base64url without padding, as in JWTs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt(header: Any, claims: Any, secret: bytes | None) -> str:
    """A hand-built JWT; signed with HMAC-SHA256 under ``secret``, or unsigned if None."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


# -- messages and receipts -----------------------------------------------------------------


async def test_version_2_marks_the_end_of_the_backlog(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        queued = [(await alice.client.send("bob", f"queued {n}")).id for n in range(3)]
        async with raw_connect(chat_node.url) as raw:
            await raw.send(hello(chat_node.token("bob"), versions=(1, 2)))
            await raw.expect("welcome", user="bob", version=2)
            backlog = [await raw.expect("msg", **{"from": "alice"}) for _ in queued]
            assert [m["id"] for m in backlog] == queued
            await raw.expect("synced", seq=backlog[-1]["seq"])
            live = await alice.client.send("bob", "live")
            assert (await raw.expect("msg"))["id"] == live.id


async def test_version_2_marks_an_empty_backlog_and_version_1_gets_no_mark(
        chat_node: RunningNode) -> None:
    async with raw_connect(chat_node.url) as raw:
        await raw.send(hello(chat_node.token("bob"), versions=(1, 2)))
        await raw.expect("welcome", version=2)
        assert (await raw.frame())["t"] == "synced"
    async with raw_connect(chat_node.url) as raw:
        await raw.send(hello(chat_node.token("bob"), versions=(1,)),
                       {"t": "lastseen", "user": "carol"})
        await raw.expect("welcome", version=1)
        await raw.expect("presence", user="carol")  # the answer came first: no mark


async def test_client_library_waits_for_the_backlog(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        queued = [(await alice.client.send("bob", f"queued {n}")).id for n in range(3)]
        async with login(chat_node, "bob") as bob:
            with trio.fail_after(TIMEOUT):
                await bob.client.wait_synced()
            backlog = bob.backlog()  # what the library holds for the application now
            assert [m.id for m in backlog if isinstance(m, Msg)] == queued
            live = await alice.client.send("bob", "live")
            assert (await bob.next(Msg)).id == live.id


async def test_client_library_tells_a_lastseen_answer_from_a_subscription(
        chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        # The subscription's first state and the answer are both about bob and alike
        # but for `watch`: each must go where it belongs, in whatever order they come.
        await alice.client.subscribe(["bob"])
        answer = await alice.client.last_seen("bob")
        event = await alice.next(Presence)
        assert (answer.user, answer.watch, event.user, event.watch) == (
            "bob", False, "bob", True)


@pytest.mark.parametrize("version", [1, 2])
async def test_presence_from_a_subscription_is_marked_in_version_2(
        chat_node: RunningNode, version: int) -> None:
    async with raw_connect(chat_node.url) as raw:
        await raw.send(hello(chat_node.token("alice"), versions=(version,)),
                       {"t": "subscribe", "users": ["bob"]}, {"t": "lastseen", "user": "bob"})
        await raw.expect("welcome", version=version)
        frames = [await raw.frame() for _ in range(3 if version == 2 else 2)]
        presence = [f for f in frames if f["t"] == "presence"]
        watched = {"watch": True} if version == 2 else {}
        plain = {"t": "presence", "user": "bob", "online": False}
        assert sorted(presence, key=len) == [plain, {**plain, **watched}]  # either order
        async with login(chat_node, "bob"):
            await raw.expect("presence", user="bob", online=True,
                             watch=True if version == 2 else None)


async def test_online_message_gets_sent_then_delivered_and_read_receipts(
        chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        sent = await alice.client.send("bob", "hello bob", id="m1")
        assert (sent.id, sent.dup) == ("m1", False) and sent.ts > 0

        msg = await bob.next(Msg)
        assert (msg.seq, msg.id, msg.sender, msg.body, msg.ts) == (
            1, "m1", "alice", "hello bob", sent.ts)

        await bob.client.ack(msg.seq)
        receipt = await alice.next(Receipt)
        assert (receipt.status, receipt.by, receipt.ids) == ("delivered", "bob", ["m1"])

        await bob.client.read(msg.seq)
        receipt = await alice.next(Receipt)
        assert (receipt.status, receipt.by, receipt.ids) == ("read", "bob", ["m1"])


async def test_offline_messages_delivered_once_in_order(chat_node: RunningNode) -> None:
    ids = [f"m{i}" for i in range(1, 6)]
    async with login(chat_node, "alice") as alice:
        for msg_id in ids:
            await alice.client.send("bob", f"body of {msg_id}", id=msg_id)

        async with login(chat_node, "bob") as bob:
            msgs = await bob.msgs(len(ids))
            assert [(m.seq, m.id, m.body) for m in msgs] == [
                (seq, msg_id, f"body of {msg_id}") for seq, msg_id in enumerate(ids, 1)]
            await bob.client.ack(msgs[-1].seq)
            receipt = await alice.next(Receipt)
            assert (receipt.status, receipt.ids) == ("delivered", ids)

        # Everything was acknowledged: the next connection gets only what is new.
        async with login(chat_node, "bob") as bob:
            await alice.client.send("bob", "sentinel", id="sentinel")
            msg = await bob.next(Msg)
            assert msg.id == "sentinel" and msg.seq > msgs[-1].seq
            if chat_node.contiguous:
                assert msg.seq == 6


async def test_unacked_messages_redelivered_on_each_new_connection(
        chat_node: RunningNode) -> None:
    ids = [f"m{i}" for i in range(1, 6)]
    async with login(chat_node, "alice") as alice:
        for msg_id in ids:
            await alice.client.send("bob", msg_id, id=msg_id)
    for _ in range(2):
        # A new Client each time: its duplicate filter does not span connections.
        async with login(chat_node, "bob") as bob:
            msgs = await bob.msgs(len(ids))
            assert [(m.seq, m.id) for m in msgs] == list(enumerate(ids, 1))


async def test_hello_resume_treats_up_to_n_as_delivered(chat_node: RunningNode) -> None:
    ids = [f"m{i}" for i in range(1, 6)]
    async with login(chat_node, "alice") as alice:
        for msg_id in ids:
            await alice.client.send("bob", msg_id, id=msg_id)
        async with login(chat_node, "bob", resume=2) as bob:
            msgs = await bob.msgs(3)
            assert [(m.seq, m.id) for m in msgs] == [(3, "m3"), (4, "m4"), (5, "m5")]
            receipt = await alice.next(Receipt)
            assert (receipt.status, receipt.by, receipt.ids) == ("delivered", "bob",
                                                                  ["m1", "m2"])


async def test_receipts_for_offline_sender_are_queued(chat_node: RunningNode) -> None:
    registry = chat_node.node.registry
    async with login(chat_node, "alice") as alice:
        await alice.client.send("bob", "hi", id="m1")
    await until(lambda: "alice" not in registry.local)

    async with login(chat_node, "bob") as bob:
        msg = await bob.next(Msg)
        await bob.client.read(msg.seq)  # delivered and read at once
        await bob.client.last_seen("alice")  # a round trip: the read was handled
    assert await queued(chat_node, "alice") == 2

    async with login(chat_node, "alice") as alice:
        delivered, read = await alice.next(Receipt), await alice.next(Receipt)
        assert (delivered.status, delivered.by, delivered.ids) == ("delivered", "bob", ["m1"])
        assert (read.status, read.by, read.ids) == ("read", "bob", ["m1"])
        assert read.seq > delivered.seq
        if chat_node.contiguous:
            assert (delivered.seq, read.seq) == (1, 2)


async def test_cumulative_ack_gives_one_receipt_for_all_ids(chat_node: RunningNode) -> None:
    ids = ["m1", "m2", "m3"]
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        for msg_id in ids:
            await alice.client.send("bob", msg_id, id=msg_id)
        msgs = await bob.msgs(3)
        assert [m.seq for m in msgs] == [1, 2, 3]

        await bob.client.ack(3)
        receipt = await alice.next(Receipt)
        assert (receipt.status, receipt.by, receipt.ids) == ("delivered", "bob", ids)
        # Nothing else came from that ack: the next receipt is the one the read makes.
        await bob.client.read(3)
        receipt = await alice.next(Receipt)
        assert (receipt.status, receipt.by, receipt.ids) == ("read", "bob", ids)


async def test_a_run_of_acks_in_one_message_is_applied_as_one(chat_node: RunningNode) -> None:
    # A client that acknowledges each message as it comes, and has fallen behind, sends a
    # run of cumulative acks; the server applies the highest (one store write), and the
    # sender gets each id once per status, in one receipt each.
    ids = [f"m{i}" for i in range(1, 6)]
    async with (login(chat_node, "alice") as alice,
                raw_login(chat_node, "bob") as bob):
        for msg_id in ids:
            await alice.client.send("bob", msg_id, id=msg_id)
        seqs = [(await bob.expect("msg"))["seq"] for _ in ids]
        await bob.send(*[{"t": "ack", "status": status, "upto": seq}
                         for seq in seqs for status in ("delivered", "read")])
        delivered = await alice.next(Receipt)
        read = await alice.next(Receipt)
        assert (delivered.status, delivered.ids) == ("delivered", ids)
        assert (read.status, read.ids) == ("read", ids)
        assert await queued(chat_node, "bob") == 0


async def test_read_with_peer_marks_only_that_peers_messages(chat_node: RunningNode) -> None:
    async with (login(chat_node, "alice") as alice, login(chat_node, "carol") as carol,
                login(chat_node, "bob") as bob):
        await alice.client.send("bob", "a1", id="a1")
        await carol.client.send("bob", "c1", id="c1")
        await alice.client.send("bob", "a2", id="a2")
        msgs = await bob.msgs(3)
        assert [(m.seq, m.id) for m in msgs] == [(1, "a1"), (2, "c1"), (3, "a2")]

        await bob.client.read(3, peer="alice")
        delivered, read = await alice.next(Receipt), await alice.next(Receipt)
        assert (delivered.status, delivered.ids) == ("delivered", ["a1", "a2"])
        assert (read.status, read.ids) == ("read", ["a1", "a2"])
        receipt = await carol.next(Receipt)
        assert (receipt.status, receipt.ids) == ("delivered", ["c1"])

        # Carol's queue is ordered: had c1 been marked read, that receipt would come first.
        await bob.client.send("carol", "sentinel", id="sentinel")
        msg = await carol.next(Msg)
        assert msg.id == "sentinel"

        await bob.client.read(3, peer="carol")
        receipt = await carol.next(Receipt)
        assert (receipt.status, receipt.by, receipt.ids) == ("read", "bob", ["c1"])


async def test_ack_beyond_what_was_delivered_is_clamped(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        async with login(chat_node, "bob") as bob:
            await alice.client.send("bob", "one", id="m1")
            assert (await bob.next(Msg)).seq == 1
            await bob.client.ack(1000)
            receipt = await alice.next(Receipt)
            assert (receipt.status, receipt.ids) == ("delivered", ["m1"])
            await alice.client.send("bob", "two", id="m2")
            m2 = await bob.next(Msg)
            assert m2.id == "m2"
            if chat_node.contiguous:
                assert m2.seq == 2

        # m2 was received but not acknowledged; m3 is queued. An ack of 1000 sent with the
        # hello comes before anything is delivered on the new connection: it acks nothing.
        await alice.client.send("bob", "three", id="m3")
        ack = {"t": "ack", "status": "delivered", "upto": 1000}
        async with raw_login(chat_node, "bob", ack) as raw:
            first, second = await raw.expect("msg"), await raw.expect("msg")
            assert (first["seq"], first["id"]) == (m2.seq, "m2")
            assert second["id"] == "m3" and second["seq"] > m2.seq


async def test_read_ack_after_reconnect_gives_read_receipt(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        await alice.client.send("bob", "hi", id="m1")
        async with login(chat_node, "bob") as bob:
            await bob.client.ack((await bob.next(Msg)).seq)
            assert (await alice.next(Receipt)).status == "delivered"

        async with login(chat_node, "bob", resume=1) as bob:
            await bob.client.read(1)
            await bob.client.send("alice", "sentinel", id="sentinel")
            # alice's queue is ordered: a read receipt from that ack comes before the msg.
            receipt = await alice.next(Receipt)
            assert (receipt.status, receipt.by, receipt.ids) == ("read", "bob", ["m1"])


async def test_duplicate_message_id_is_accepted_once(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        first = await alice.client.send("bob", "hello", id="dup-1")
        second = await alice.client.send("bob", "hello again", id="dup-1")
        assert not first.dup
        assert (second.id, second.dup, second.ts) == ("dup-1", True, first.ts)

        await alice.client.send("bob", "after", id="after-1")
        msgs = await bob.msgs(2)
        # seq 2 for the next message: the duplicate was never queued.
        assert [(m.seq, m.id, m.body) for m in msgs] == [(1, "dup-1", "hello"),
                                                         (2, "after-1", "after")]


async def test_message_id_reused_for_another_recipient_is_a_conflict(
        chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice, login(chat_node, "carol") as carol:
        await alice.client.send("bob", "for bob", id="same")
        await alice.client.submit([("same", "carol", "for carol")])
        error = await alice.next(Error)
        assert (error.code, error.ref) == ("id_conflict", "same")

        # The connection stays open and usable; carol never got the conflicting message.
        sent = await alice.client.send("carol", "really for carol", id="other")
        msg = await carol.next(Msg)  # the first item of carol's queue
        assert msg.id == sent.id
        if chat_node.contiguous:
            assert msg.seq == 1
        assert alice.client.closed is None


# -- authentication --------------------------------------------------------------------------


def _alg_none(node: RunningNode, signed: bool) -> str:
    claims = {"sub": "bob", "exp": int(time.time()) + 3600}
    return jwt({"alg": "none", "typ": "JWT"}, claims, node.secret if signed else None)


_HS256 = b64url(b'{"alg":"HS256","typ":"JWT"}')

BAD_TOKENS: dict[str, tuple[Callable[[RunningNode], str], str]] = {
    "wrong_signature": (lambda n: mint_token(b"not the secret", "bob", 3600), "auth_failed"),
    "expired": (lambda n: n.token("bob", ttl=-60), "token_expired"),
    "not_a_jwt": (lambda n: "not-a-token", "auth_failed"),
    "garbage_parts": (lambda n: "abc.def.ghi", "auth_failed"),
    "alg_none_unsigned": (lambda n: _alg_none(n, signed=False), "auth_failed"),
    "alg_none_signed": (lambda n: _alg_none(n, signed=True), "auth_failed"),
    "non_ascii_claims": (lambda n: f"{_HS256}.\u00e9\u00e9\u00e9\u00e9.AAAA", "auth_failed"),
    "deeply_nested_header": (lambda n: f"{b64url(b'[' * 5000)}.e30.AAAA", "auth_failed"),
}


@pytest.mark.parametrize("case", [
    *BAD_TOKENS,
])
async def test_bad_token_is_refused_with_4401(chat_node: RunningNode, case: str) -> None:
    make_token, code = BAD_TOKENS[case]
    async with raw_connect(chat_node.url) as raw:
        await raw.send(hello(make_token(chat_node)))
        frames = await raw.expect_close(4401, code)
        assert len(frames) == 1  # no welcome
    assert "bob" not in chat_node.node.registry.local


async def test_no_hello_within_auth_timeout_closes_4408(make_node: MakeNode) -> None:
    node = await make_node(auth_timeout=0.3)
    async with raw_connect(node.url) as raw:
        start = trio.current_time()
        await raw.expect_close(4408, "auth_timeout")
        assert trio.current_time() - start >= 0.25


async def test_first_frame_must_be_hello(chat_node: RunningNode) -> None:
    async with raw_connect(chat_node.url) as raw:
        await raw.send({"t": "send", "id": "m1", "to": "bob", "body": "hi"},
                       hello(chat_node.token("alice")))
        await raw.expect_close(4400, "hello_required")


async def test_unsupported_version_closes_4426(chat_node: RunningNode) -> None:
    async with raw_connect(chat_node.url) as raw:
        await raw.send(hello(chat_node.token("alice"), versions=(99,)))
        await raw.expect_close(4426, "unsupported_version")


# -- identity --------------------------------------------------------------------------------


async def test_send_frame_with_a_from_field_is_refused(chat_node: RunningNode) -> None:
    async with login(chat_node, "bob") as bob:
        async with raw_login(chat_node, "mallory") as raw:
            await raw.send({"t": "send", "id": "m1", "to": "bob", "body": "I am alice",
                            "from": "alice"})
            await raw.expect_close(4400, "unknown_field")
        # Nothing reached bob: the first message he gets is carol's, with seq 1.
        async with login(chat_node, "carol") as carol:
            await carol.client.send("bob", "from carol", id="c1")
        msg = await bob.next(Msg)
        assert (msg.seq, msg.id, msg.sender) == (1, "c1", "carol")


async def test_acks_only_touch_the_connected_users_queue(chat_node: RunningNode) -> None:
    async with login(chat_node, "carol") as carol:
        for msg_id in ("a1", "a2"):
            await carol.client.send("alice", msg_id, id=msg_id)  # alice is offline
        async with login(chat_node, "bob") as bob:
            for msg_id in ("b1", "b2"):
                await carol.client.send("bob", msg_id, id=msg_id)
            seqs = [m.seq for m in await bob.msgs(2)]
            assert seqs[0] < seqs[1]
            if chat_node.contiguous:
                assert seqs == [1, 2]
            await bob.client.read(1000)  # clamped to the last seq bob was sent
            for status in ("delivered", "read"):
                receipt = await carol.next(Receipt)
                assert (receipt.status, receipt.by, receipt.ids) == (status, "bob",
                                                                     ["b1", "b2"])

        async with login(chat_node, "alice") as alice:
            msgs = await alice.msgs(2)
            assert [(m.seq, m.id) for m in msgs] == [(1, "a1"), (2, "a2")]
            await alice.client.ack(2)
            receipt = await carol.next(Receipt)
            assert (receipt.status, receipt.by, receipt.ids) == ("delivered", "alice",
                                                                 ["a1", "a2"])


async def test_second_login_takes_over_the_session(chat_node: RunningNode) -> None:
    async with (login(chat_node, "alice") as alice, login(chat_node, "bob") as first,
                login(chat_node, "bob") as second):
        events, closed = await first.drain()
        assert [(e.code if isinstance(e, Error) else e) for e in events] == [
            "session_replaced"]
        assert closed.code == 4409

        sent = await alice.client.send("bob", "to the new session")
        msg = await second.next(Msg)
        assert (msg.id, msg.sender) == (sent.id, "alice")


async def test_an_ended_session_is_freed_without_the_collector(chat_node: RunningNode) -> None:
    """Sessions that end (the client leaves, a second login takes over) leave no reference
    cycle behind: with the collector off, none of their objects is left once they are
    done. A cycle would wait for the collector's next full pass, which visits every live
    session's objects and stops the node meanwhile."""
    kinds = (Session, Writer, WebSocket, Mailbox)
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects() if type(o) in kinds}  # the node's actors
        async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
            await exchange(alice, bob)
            async with login(chat_node, "bob"):
                _, closed = await bob.drain()
                assert closed.code == 4409
        listener = chat_node.node.listener
        assert listener is not None
        await until(lambda: listener.live_sessions == 0)
        left = [type(o).__name__ for o in gc.get_objects()
                if type(o) in kinds and id(o) not in before]
        assert left == []
    finally:
        gc.enable()


async def test_a_later_login_takes_over_even_if_the_clock_stepped_back(
        chat_node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = [1_000_000, 2_000_000]  # popped from the end: the second login is "earlier"
    monkeypatch.setattr("chatd.registry.now_ms", lambda: stamps.pop() if stamps else 0)
    async with login(chat_node, "bob") as first, login(chat_node, "bob") as second:
        _, closed = await first.drain()
        assert closed.code == 4409
        assert chat_node.node.registry.local["bob"].serial == int(
            second.client.welcome.session.rsplit(".", 1)[1])


# -- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "close_code", "error"), [
    pytest.param(b"\xff\xfe", 4400, "bad_cbor", id="non_cbor"),
    pytest.param("a text message", 1003, "text_frame", id="text"),
    pytest.param(b"\x00" * 65537, 1009, None, id="oversized"),
])
async def test_malformed_message_closes_only_that_connection(
        chat_node: RunningNode, payload: bytes | str, close_code: int,
        error: str | None) -> None:
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        async with raw_login(chat_node, "mallory") as raw:
            await raw.ws.send_message(payload)
            await raw.expect_close(close_code, error)
        await exchange(alice, bob)


# -- flow control and failures ---------------------------------------------------------------


def bob_told_to_exit(node: RunningNode) -> bool:
    """Whether bob's session is gone from the registry or has been told to exit."""
    address = node.node.registry.local.get("bob")
    mailbox = node.node.actors.lookup(address) if address is not None else None
    return mailbox is None or mailbox.exiting


async def flood_until(node: RunningNode, alice: Peer, done: Callable[[], bool]) -> list[str]:
    """Send big messages to bob until ``done()``; the ids sent."""
    body = "x" * 16000
    sent: list[str] = []
    with trio.fail_after(30):
        while not done():
            sent.append((await alice.client.send("bob", body, id=f"m{len(sent)}")).id)
    return sent


async def test_slow_consumer_is_dropped_and_loses_nothing(make_node: MakeNode) -> None:
    node = await make_node(mailbox_capacity=4)
    async with login(node, "alice") as alice, raw_login(node, "bob") as raw:
        # raw reads nothing from here on: the socket buffers fill, then its mailbox.
        sent = await flood_until(node, alice, lambda: "bob" not in node.node.registry.local)
        frames, _ = await raw.read_to_close()
        received = [f["id"] for f in frames if f["t"] == "msg"]
        assert received == sent[:len(received)] and len(received) < len(sent)

    async with login(node, "bob") as bob:
        msgs = await bob.msgs(len(sent))
        assert [m.id for m in msgs] == sent
        assert [m.seq for m in msgs] == list(range(1, len(sent) + 1))


async def test_slow_consumer_sees_slow_consumer_error_and_4420(make_node: MakeNode) -> None:
    node = await make_node(mailbox_capacity=4)
    async with login(node, "alice") as alice, raw_login(node, "bob") as raw:
        # bob starts reading again within the grace a write under way is given, so the
        # message cut short by the exit signal is finished before the error and close.
        await flood_until(node, alice, lambda: bob_told_to_exit(node))
        frames, close_code = await raw.read_to_close()
        assert frames and frames[-1].get("code") == "slow_consumer"
        assert close_code == 4420


async def test_crashing_session_is_closed_1011_and_others_carry_on(
        chat_node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    router = chat_node.node.router
    submit_many = router.submit_many

    async def crashing_submit(sender: str, frames: Any, *args: Any) -> Any:
        if any(frame.body == "crash" for frame in frames):
            raise RuntimeError("injected crash")
        return await submit_many(sender, frames, *args)

    monkeypatch.setattr(router, "submit_many", crashing_submit)
    async with login(chat_node, "bob") as bob, login(chat_node, "carol") as carol:
        async with login(chat_node, "alice") as alice:
            await alice.client.submit([("boom", "bob", "crash")])
            events, closed = await alice.drain()
            assert (events, closed.code) == ([], 1011)

        await exchange(bob, carol)

        async with login(chat_node, "alice") as alice:
            sent = await alice.client.send("bob", "back again")
            msg = await bob.next(Msg)
            assert (msg.id, msg.sender) == (sent.id, "alice")


async def test_inline_write_failure_closes_only_the_recipient(
        chat_node: RunningNode, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A failure while writing to a recipient inline, in the sender's task or in the
    presence actor's, ends the recipient's session alone (1011); the sender and presence go
    on, and nothing is restarted."""
    inline = Writer.inline

    def failing_inline(self: Writer) -> bool:
        if self._user in ("bob", "carol"):
            raise RuntimeError("injected inline failure")
        return inline(self)

    monkeypatch.setattr(Writer, "inline", failing_inline)
    async with login(chat_node, "alice") as alice:
        async with login(chat_node, "bob") as bob:
            sent = await alice.client.send("bob", "written inline")  # in alice's reader
            events, closed = await bob.drain()
            assert (events, closed.code, closed.reason) == ([], 1011, "internal")
        async with login(chat_node, "carol") as carol:
            await carol.client.subscribe(["dave"])
            async with login(chat_node, "dave"):  # presence pushes "online" to carol
                events, closed = await carol.drain()
                assert closed.code == 1011
                await alice.client.subscribe(["dave"])
                assert (await alice.next(Presence)).online is True
        assert (await alice.client.last_seen("bob")).online is False
    monkeypatch.setattr(Writer, "inline", inline)
    async with login(chat_node, "bob") as bob:  # nothing was lost
        assert [m.id for m in await bob.msgs(1)] == [sent.id]
    failures = [r for r in caplog.records if r.getMessage() == "inline_failed"]
    assert len(failures) == 2
    assert not [r for r in caplog.records if r.getMessage() in (
        "child_crashed", "child_restarted", "session_crashed")]


# -- presence --------------------------------------------------------------------------------


async def test_last_seen_never_seen_online_then_offline(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        never = await alice.client.last_seen("bob")
        assert (never.online, never.last_seen) == (False, None)

        before = int(time.time() * 1000)
        async with login(chat_node, "bob"):
            online = await alice.client.last_seen("bob")
            assert online.online is True
        after = int(time.time() * 1000)

        with trio.fail_after(TIMEOUT):
            while (gone := await alice.client.last_seen("bob")).online:
                await trio.sleep(0.01)
        assert gone.last_seen is not None and before <= gone.last_seen <= after + 1000


async def test_subscription_gets_current_state_then_changes(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        await alice.client.subscribe(["bob"])
        now = await alice.next(Presence)
        assert (now.user, now.online, now.last_seen) == ("bob", False, None)

        async with login(chat_node, "bob"):
            up = await alice.next(Presence)
            assert (up.user, up.online) == ("bob", True)
        down = await alice.next(Presence)
        assert (down.user, down.online) == ("bob", False) and down.last_seen is not None


async def test_silent_user_goes_offline_after_threshold(make_node: MakeNode) -> None:
    # Presence compares wall-clock timestamps (they are shared between nodes), so this runs
    # on real time: the threshold is long enough for the subscription to see bob online
    # first on a loaded machine, and the bound below is only that he is not dropped early.
    threshold = 2.0
    node = await make_node(online_threshold=threshold)
    async with login(node, "alice") as alice:
        joined = trio.current_time()
        async with login(node, "bob") as bob:
            await alice.client.subscribe(["bob"])
            assert (await alice.next(Presence)).online is True
            offline = await alice.next(Presence)  # bob says nothing
            assert (offline.user, offline.online) == ("bob", False)
            assert offline.last_seen is not None
            assert trio.current_time() - joined >= threshold * 0.9
            assert bob.client.closed is None and "bob" in node.node.registry.local

            await bob.client.last_seen("alice")  # activity brings bob back online
            back = await alice.next(Presence)
            assert (back.user, back.online) == ("bob", True)


async def test_too_many_subscriptions_is_refused_but_not_fatal(make_node: MakeNode) -> None:
    node = await make_node(max_subscriptions=2)
    async with login(node, "alice") as alice:
        await alice.client.subscribe(["u1", "u2"])
        assert {(await alice.next(Presence)).user for _ in range(2)} == {"u1", "u2"}
        await alice.client.subscribe(["u3"])
        error = await alice.next(Error)
        assert error.code == "too_many_subscriptions"
        presence = await alice.client.last_seen("u3")  # still connected
        assert presence.user == "u3" and alice.client.closed is None


# -- shutdown (keepalive: test_keepalive.py) ------------------------------------------------


async def test_graceful_shutdown_closes_clients_1001(chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        chat_node.node.request_shutdown()
        for peer in (alice, bob):
            events, closed = await peer.drain()
            assert [(e.code if isinstance(e, Error) else e) for e in events] == [
                "shutting_down"]
            assert closed.code == 1001
    await until(lambda: chat_node.node.listener.live_sessions == 0)  # type: ignore[union-attr]
    with pytest.raises(HandshakeError):  # the listening socket is closed
        async with raw_connect(chat_node.url):
            pass


async def test_graceful_shutdown_also_closes_connections_still_authenticating(
        make_node: MakeNode) -> None:
    node = await make_node(shutdown_timeout=1.0)
    async with login(node, "alice") as alice, raw_connect(node.url) as raw:
        node.node.request_shutdown()
        _, closed = await alice.drain()  # the drain has begun
        assert closed.code == 1001
        # Never authenticated, it is still told why and closed at once, not left to time out.
        await raw.expect_close(1001, "shutting_down")


async def test_node_stops_promptly_while_a_write_is_blocked(tmp_path: Path) -> None:
    """Cancelling the tree (no exit signal) must not wait on a client that never reads."""
    config = load_config(data_dir=tmp_path / "data", port=0, mailbox_capacity=100_000)
    node = Node(config)
    running = RunningNode(node, b"")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            running.secret = load_or_create_secret(config.secret_path)
            async with raw_connect(node.url, queue=0) as raw, login(running, "alice") as alice:
                await raw.send(hello(running.token("bob")))
                await until(lambda: "bob" in node.registry.local)

                def bob_blocked_in_a_write() -> bool:
                    assert node.listener is not None
                    return any(s.user == "bob" and s.writing for s in node.listener.sessions)

                body = "x" * 16000
                while not bob_blocked_in_a_write():
                    await alice.client.send("bob", body)
                nursery.cancel_scope.cancel()
