"""Keepalive on a real node, on trio's virtual clock (docs/protocol.md 2.6).

The node and the clients talk over real loopback sockets; time is a
:class:`trio.testing.MockClock` that jumps ahead whenever every task has been waiting for
``AUTOJUMP`` seconds of real time, so a minute of keepalive takes a fraction of a second
and the assertions are about exact times. The server's pings are counted where they are
sent (:meth:`chatd.transport.WebSocket.ping`); the clients are trio-websocket connections,
which answer pings by themselves unless their reader is stopped.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from conftest import RunningNode
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from chatd.session._keepalive import KeepaliveWheel
from chatd.transport import WebSocket

#: Real seconds every task must have waited before the virtual clock jumps ahead; long
#: enough for bytes on loopback to arrive first.
AUTOJUMP = 0.02
#: Virtual seconds any single wait in these tests may take.
TIMEOUT = 600.0

MakeNode = Callable[..., Any]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """The virtual clock pytest-trio runs these tests on."""
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP)


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times at which the server sends a ping, on any connection."""
    times: list[float] = []
    original = WebSocket.ping

    def ping(self: WebSocket) -> None:
        times.append(trio.current_time())
        original(self)

    monkeypatch.setattr(WebSocket, "ping", ping)
    return times


def frames_of(data: bytes | str) -> list[dict[str, Any]]:
    assert isinstance(data, bytes)
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(fp)
    items = []
    while fp.tell() < len(data):
        items.append(decoder.decode())
    return items


@asynccontextmanager
async def logged_in(node: RunningNode, user: str, *,
                    answers_pings: bool = True) -> AsyncIterator[tuple[WebSocketConnection,
                                                                        float]]:
    """A connection that said hello; yields it and the time the welcome arrived.

    Without ``answers_pings``, nothing reads the connection after the hello, which stops
    trio-websocket's reader (its queue holds no message) and with it the pongs.
    """
    queue = 1 if answers_pings else 0
    async with open_websocket_url(node.url, message_queue_size=queue) as ws:
        await ws.send_message(cbor2.dumps({"t": "hello", "versions": [1],
                                           "token": node.token(user)}))
        if answers_pings:
            with trio.fail_after(TIMEOUT):
                assert frames_of(await ws.get_message())[0]["t"] == "welcome"
        yield ws, trio.current_time()


async def read_forever(ws: WebSocketConnection, into: list[dict[str, Any]]) -> None:
    """Read every frame (so pongs keep going out) until the connection closes."""
    try:
        while True:
            into.extend(frames_of(await ws.get_message()))
    except ConnectionClosed:
        return


async def test_client_sending_every_2s_is_never_pinged(
        make_node: MakeNode, clock: trio.testing.MockClock, pings: list[float]) -> None:
    node = await make_node(store="memory")
    async with logged_in(node, "alice") as (ws, _), trio.open_nursery() as nursery:
        got: list[dict[str, Any]] = []
        nursery.start_soon(read_forever, ws, got)
        for _ in range(50):  # 100 s
            await trio.sleep(2.0)
            await ws.send_message(cbor2.dumps({"t": "lastseen", "user": "bob"}))
        with trio.fail_after(TIMEOUT):
            while len(got) < 50:
                await trio.sleep(2.0)
        assert pings == []
        nursery.cancel_scope.cancel()


async def test_silent_client_answering_pings_is_pinged_every_interval(
        make_node: MakeNode, clock: trio.testing.MockClock, pings: list[float]) -> None:
    node = await make_node(store="memory")
    async with logged_in(node, "alice") as (ws, start), trio.open_nursery() as nursery:
        nursery.start_soon(read_forever, ws, [])
        with trio.fail_after(TIMEOUT):
            while len(pings) < 4:
                await trio.sleep(5.0)
        assert [t - start for t in pings] == pytest.approx([20.0, 40.0, 60.0, 80.0], abs=0.5)
        assert "alice" in node.node.registry.local
        nursery.cancel_scope.cancel()


async def test_frame_right_after_hello_draws_one_ping(
        make_node: MakeNode, clock: trio.testing.MockClock, pings: list[float]) -> None:
    node = await make_node(store="memory")
    async with logged_in(node, "alice") as (ws, start), trio.open_nursery() as nursery:
        nursery.start_soon(read_forever, ws, [])
        await ws.send_message(cbor2.dumps({"t": "lastseen", "user": "bob"}))
        await trio.sleep(30.0)
        assert [t - start for t in pings] == pytest.approx([20.0], abs=0.5)
        nursery.cancel_scope.cancel()


async def test_client_not_answering_pings_is_closed_4410_at_idle_timeout(
        make_node: MakeNode, clock: trio.testing.MockClock, pings: list[float]) -> None:
    node = await make_node(store="memory")
    async with logged_in(node, "bob", answers_pings=False) as (ws, start):
        with trio.fail_after(TIMEOUT):
            while "bob" not in node.node.registry.local:
                await trio.sleep(0.1)
            while "bob" in node.node.registry.local:
                await trio.sleep(1.0)
        ended = trio.current_time()
        assert [t - start for t in pings] == pytest.approx([20.0], abs=0.5)
        assert 60.0 <= ended - start <= 61.5
        frames: list[dict[str, Any]] = []
        with trio.fail_after(TIMEOUT):
            await read_forever(ws, frames)
        assert ws.closed is not None and ws.closed.code == 4410
        assert [f["t"] for f in frames] == ["welcome", "error"]
        assert frames[-1]["code"] == "idle_timeout"


# -- the wheel: every connection's keepalive from one task --------------------------------


class Target:
    """A stand-in connection that notes when it is ticked and asks to be ticked again
    ``every`` seconds later, ``times`` times."""

    def __init__(self, every: float, times: int) -> None:
        self.every = every
        self.times = times
        self.ticked: list[float] = []

    def tick(self, now: float) -> float | None:
        self.ticked.append(now)
        return now + self.every if len(self.ticked) < self.times else None


async def test_the_wheel_ticks_each_connection_when_due_rounded_up_to_its_resolution(
        clock: trio.testing.MockClock) -> None:
    wheel = KeepaliveWheel(resolution=0.25)
    start = trio.current_time()
    a, b = Target(20.0, 3), Target(7.0, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wheel.run)
        wheel.schedule(a, start + 20.0)
        wheel.schedule(b, start + 7.1)
        assert len(wheel) == 2
        with trio.fail_after(TIMEOUT):
            while len(a.ticked) < 3 or len(b.ticked) < 2:
                await trio.sleep(1.0)
        assert len(wheel) == 0  # both said they were done
        nursery.cancel_scope.cancel()
    assert [t - start for t in a.ticked] == pytest.approx([20.0, 40.0, 60.0], abs=0.25)
    assert [t - start for t in b.ticked] == pytest.approx([7.25, 14.25], abs=0.01)


async def test_a_nearer_connection_wakes_the_wheel_and_a_removed_one_is_never_ticked(
        clock: trio.testing.MockClock) -> None:
    wheel = KeepaliveWheel(resolution=0.25)
    start = trio.current_time()
    far, near, gone = Target(1.0, 1), Target(1.0, 1), Target(1.0, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wheel.run)
        wheel.schedule(far, start + 100.0)
        wheel.schedule(gone, start + 3.0)
        await trio.testing.wait_all_tasks_blocked()  # the wheel sleeps until 3.0
        wheel.schedule(near, start + 1.0)
        wheel.remove(gone)
        wheel.schedule(far, start + 50.0)  # filed again: only the later time counts
        with trio.fail_after(TIMEOUT):
            while not far.ticked:
                await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert [t - start for t in near.ticked] == pytest.approx([1.0], abs=0.01)
    assert gone.ticked == []
    assert [t - start for t in far.ticked] == pytest.approx([50.0], abs=0.01)


async def test_idle_sessions_are_on_the_node_wheel_and_leave_it_when_they_end(
        make_node: MakeNode, clock: trio.testing.MockClock, pings: list[float]) -> None:
    node = await make_node(store="memory")
    wheel = node.node.listener._ctx.keepalives
    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(_hold_silently, node, f"user{n}")
        with trio.fail_after(TIMEOUT):
            while len(wheel) < 3:
                await trio.sleep(0.1)
            while len(pings) < 3:  # one ping each, from the wheel's task
                await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    with trio.fail_after(TIMEOUT):
        while node.node.registry.local:
            await trio.sleep(0.1)
    assert len(wheel) == 0


async def _hold_silently(node: RunningNode, user: str) -> None:
    async with logged_in(node, user) as (ws, _):
        await read_forever(ws, [])
