"""The benchmark peer: a minimal chat router on ``websockets`` and uvloop, in memory.

The measuring stick the benchmarks compare chatd against: what a Python developer would
write instead of chatd, on the best-known asyncio WebSocket library and the fastest event
loop. It speaks chatd's wire protocol (docs/protocol.md) for the frames the load generator
uses (``hello``/``welcome`` with the same HS256 tokens, ``send``/``sent``/``msg``,
cumulative ``ack`` and its ``receipt`` frames), so one load generator drives both servers.
Each user has a queue numbered by one sequence, shared by messages and receipts; items stay
queued until acknowledged and are sent again on the next login, as in chatd.

It does none of chatd's other work: no persistence, no idempotency memory, no presence, no
schema or limit checks beyond what cbor2 and websockets do, no flood control, no slow-consumer
cut-off, no supervision. Frames produced together for one connection (the backlog, the
receipts of one acknowledgement, the answers to one message) share a WebSocket message, as
in chatd; nothing else is batched.

Usage: ``python -m benchmarks.peers.websockets_peer --host 127.0.0.1 --port 9000
--secret-file FILE``; prints ``listening ws://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import signal
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from chatd.auth import TokenError, read_secret, verify_token

MAX_FRAME_BYTES = 65536  # largest WebSocket message, both ways (chatd's default)
MAX_STRING_BYTES = 16384  # announced in welcome; not enforced here
MAX_FRAMES = 128  # frames per message, the most chatd's client accepts
MAX_RECEIPT_IDS = 512  # ids per receipt frame
MAX_UNREAD = 10_000  # delivered-but-unread messages remembered per user
AUTH_TIMEOUT = 5.0

Frame = dict[str, Any]


class Refused(Exception):
    """End the connection with an ``error`` frame ``code`` and WebSocket close ``close``."""

    def __init__(self, code: str, close: int, message: str) -> None:
        super().__init__(message)
        self.code, self.close = code, close


@dataclass(slots=True)
class Queue:
    """One user's items: messages to them and receipts for their messages, by seq."""

    last_seq: int = 0
    pending: dict[int, Frame] = field(default_factory=dict)  # until acknowledged delivered
    unread: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (sender, id)


@dataclass(slots=True)
class Session:
    """A logged-in connection. Writers take the lock (FIFO) in the order they numbered their
    items, so items reach the client in seq order even when a write waits for the socket."""

    ws: ServerConnection
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def decode(data: str | bytes) -> list[Frame]:
    """The frames of one message: a CBOR sequence of maps."""
    if isinstance(data, str):
        raise Refused("text_frame", 1003, "frames travel in binary messages")
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(fp)
    frames: list[Frame] = []
    try:
        while not frames or fp.tell() < len(data):
            frames.append(decoder.decode())
    except cbor2.CBORError:
        raise Refused("bad_cbor", 4400, "not well-formed CBOR") from None
    return frames  # a frame that is not a map fails later, as bad_field


def pack(frames: Iterable[Frame]) -> Iterator[bytes]:
    """Encode frames into as few messages as the client's limits allow."""
    chunk: list[bytes] = []
    size = 0
    for frame in frames:
        data = cbor2.dumps(frame)
        if chunk and (len(chunk) == MAX_FRAMES or size + len(data) > MAX_FRAME_BYTES):
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield b"".join(chunk)


class Router:
    """Every user's queue and session, and the connection handler."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.queues: defaultdict[str, Queue] = defaultdict(Queue)
        self.sessions: dict[str, Session] = {}
        self.serials = itertools.count(1)
        self.background: set[asyncio.Task[None]] = set()

    def enqueue(self, user: str, frame: Frame) -> Frame:
        """Give ``frame`` the user's next seq and keep it until acknowledged."""
        queue = self.queues[user]
        queue.last_seq += 1
        frame["seq"] = queue.last_seq
        queue.pending[queue.last_seq] = frame
        return frame

    async def deliver(self, user: str, frames: list[Frame]) -> None:
        """Write items just queued for ``user`` to their session, if they have one.

        Call it right after :meth:`enqueue`, without awaiting anything in between."""
        session = self.sessions.get(user)
        if session is not None:
            async with session.lock:
                with contextlib.suppress(ConnectionClosed):  # the items stay queued
                    for message in pack(frames):
                        await session.ws.send(message)

    async def acknowledge(self, user: str, status: str, upto: int, peer: str | None) -> None:
        """Apply a cumulative ack and send the receipts it produces to the senders."""
        queue, ts = self.queues[user], now_ms()
        receipts: defaultdict[str, dict[str, list[str]]] = defaultdict(
            lambda: {"delivered": [], "read": []})
        for seq in list(itertools.takewhile(lambda s: s <= upto, queue.pending)):
            item = queue.pending.pop(seq)
            if item["t"] == "msg":
                receipts[item["from"]]["delivered"].append(item["id"])
                queue.unread[seq] = (item["from"], item["id"])
        while len(queue.unread) > MAX_UNREAD:
            del queue.unread[next(iter(queue.unread))]
        if status == "read":
            for seq in list(itertools.takewhile(lambda s: s <= upto, queue.unread)):
                sender, msg_id = queue.unread[seq]
                if peer is None or sender == peer:
                    del queue.unread[seq]
                    receipts[sender]["read"].append(msg_id)
        for sender, by_status in receipts.items():
            frames = [self.enqueue(sender, {"t": "receipt", "status": state, "by": user,
                                            "ids": ids[i:i + MAX_RECEIPT_IDS], "ts": ts})
                      for state, ids in by_status.items()
                      for i in range(0, len(ids), MAX_RECEIPT_IDS)]
            await self.deliver(sender, frames)

    async def handle(self, ws: ServerConnection, user: str, frames: list[Frame]) -> None:
        """Act on the frames of one client message, in order; answer ``send`` frames."""
        answers = []
        for frame in frames:
            if frame["t"] == "send":
                ts = now_ms()
                item = self.enqueue(frame["to"], {"t": "msg", "id": frame["id"], "from": user,
                                                  "body": frame["body"], "ts": ts})
                await self.deliver(frame["to"], [item])
                answers.append({"t": "sent", "id": frame["id"], "ts": ts})
            elif frame["t"] == "ack":
                await self.acknowledge(user, frame["status"], frame["upto"], frame.get("peer"))
        for message in pack(answers):
            await ws.send(message)

    async def login(self, ws: ServerConnection) -> tuple[str, list[Frame]]:
        """Read and check the hello; return the user and the frames that came with it."""
        async with asyncio.timeout(AUTH_TIMEOUT):
            frames = decode(await ws.recv())
        hello = frames[0]
        if hello["t"] != "hello":
            raise Refused("hello_required", 4400, "first frame must be hello")
        if 1 not in hello["versions"]:
            raise Refused("unsupported_version", 4426, "server speaks versions [1]")
        try:
            user = verify_token(self.secret, hello["token"]).sub
        except TokenError as exc:
            raise Refused(exc.code, 4401, exc.message) from None
        if hello.get("resume"):
            await self.acknowledge(user, "delivered", hello["resume"], None)
        return user, frames[1:]

    async def handler(self, ws: ServerConnection) -> None:
        """Serve one connection: hello, welcome and backlog, then client messages."""
        try:
            user, rest = await self.login(ws)
            if (old := self.sessions.get(user)) is not None:  # one session per user
                replaced = Refused("session_replaced", 4409, "a newer login took over")
                task = asyncio.create_task(refuse(old.ws, replaced))
                self.background.add(task)
                task.add_done_callback(self.background.discard)
            session = self.sessions[user] = Session(ws)
            async with session.lock:  # taken at once: the backlog goes before new items
                welcome = {"t": "welcome", "version": 1, "user": user,
                           "session": f"peer.{next(self.serials)}", "ts": now_ms(),
                           "max_frame": MAX_FRAME_BYTES, "max_body": MAX_STRING_BYTES}
                for message in pack([welcome, *self.queues[user].pending.values()]):
                    await ws.send(message)
            try:
                await self.handle(ws, user, rest)
                async for data in ws:
                    await self.handle(ws, user, decode(data))
            finally:
                if self.sessions.get(user) is session:
                    del self.sessions[user]
        except TimeoutError:
            await refuse(ws, Refused("auth_timeout", 4408, "no hello in time"))
        except Refused as exc:
            await refuse(ws, exc)
        except (AttributeError, KeyError, TypeError, ValueError):
            await refuse(ws, Refused("bad_field", 4400, "malformed frame"))
        except ConnectionClosed:
            pass


async def refuse(ws: ServerConnection, exc: Refused) -> None:
    """Send an ``error`` frame and close with its close code."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(cbor2.dumps({"t": "error", "code": exc.code, "message": str(exc)}))
        await ws.close(exc.close, exc.code)


async def main(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT."""
    router = Router(read_secret(args.secret_file))
    async with serve(router.handler, args.host, args.port, compression=None,
                     max_size=MAX_FRAME_BYTES) as server:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.close)
        port = server.sockets[0].getsockname()[1]
        print(f"listening ws://{args.host}:{port}", flush=True)
        await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--secret-file", type=Path, required=True)
    uvloop.run(main(parser.parse_args()))
