"""The load generator: one worker process of ``python -m benchmarks``, driven over stdin/stdout.

Usage: ``python -m benchmarks.loadgen --worker W``. The harness writes one JSON object per
line on stdin, ``{"cmd": NAME, ...arguments}``; the worker answers each with exactly one
line ``{"type": "reply", ...}`` (or ``{"type": "reply", "error": TEXT}``), in order, and
may write ``{"type": "progress", "done": N}`` lines while a command runs. End of stdin
closes every connection and ends the worker, so a worker never outlives its harness.

Commands:

- ``connect``: open authenticated idle sessions (``users``: ``[[name, token], ...]``) and
  keep them; the server keeps them alive with pings, which the client answers by itself.
- ``pairs``: open a sender and a recipient session per pair (``[sender, s_token, recipient,
  r_token]``, optionally followed by the sender's and the recipient's URLs when they are
  on different chatd nodes) and start reading both (with ``offline``, only the sender: the
  recipient stays offline until ``backlog``). A
  recipient answers every WebSocket message holding ``msg`` frames with one message of two
  frames: ``ack delivered`` and ``ack read`` up to the highest ``seq`` (cumulative).
- ``throughput``: each sender keeps ``window`` sends awaiting their ``sent`` and sends one
  more for each ``sent`` that arrives, one ``send`` per WebSocket message (with ``batch``,
  all the refills for one incoming message go out in one message); bodies of ``body``
  characters (100 by default); ``track`` also records send-to-``sent`` latency (the flood
  scenario: one sender with 256 outstanding, 1 KB bodies, to an offline recipient). Without
  ``read``, recipients acknowledge delivery only, so every message stays unread; with
  ``ack_receipts``, senders acknowledge the receipts they get, as ``delivered`` (the ids
  scenario: what the server remembers is its id memory, not queued receipts).
- ``latency``: each sender sends on an absolute schedule at ``rate`` messages/s (shared by
  the worker's pairs), sending at once when late, never skipping. May be given again after
  ``stop`` and ``drain``, at another rate (the SLA capacity search).
- ``backlog``: after a flood to offline recipients, open their sessions and wait until every
  message answered ``sent`` has been delivered (the server streams the backlog).
- ``mark``: the counters, this process's CPU time and the clock, optionally resetting or
  taking the latency histograms; ``stop`` ends sending; ``drain`` then waits until every
  message sent was answered, delivered and receipted (or only what ``keys`` names);
  ``close`` closes every session.

Every ``send`` body starts with the sender's ``time.perf_counter_ns()`` as 20 digits, then
padding. Senders and recipients of a pair live in the same worker, so the recipient
computes send-to-deliver latency on the same clock; it is recorded in microseconds into an
HDR-style histogram (:mod:`benchmarks.hdr`). When tracking (``latency``, and ``throughput``
with ``track``), the sender also keeps the stamp of each send awaiting its ``sent`` by id,
and records send-to-``sent`` latency, taken when it decodes the answer, into a second
histogram.

This is asyncio with uvloop and the ``websockets`` client, chosen to make the load
generator cheap per message; its CPU use is reported so a reader can check that it was not
the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import cbor2
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from benchmarks.hdr import Histogram

#: Characters of a ``send`` body by default: a 20-digit perf_counter_ns stamp, then padding.
BODY = 100
#: Most sessions the harness gives one worker (each is a file descriptor; a process may
#: have at most 20,000 open files on the machines this runs on).
MAX_SESSIONS = 9_500


class Refused(Exception):
    """The server answered the hello with something other than a welcome."""


def decode(data: bytes | str) -> list[dict[str, Any]]:
    """Decode one WebSocket message: a CBOR sequence of frames."""
    if isinstance(data, str):
        raise ValueError("the server sent a text message")
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(fp, read_size=1)
    frames: list[dict[str, Any]] = []
    while fp.tell() < len(data):
        frames.append(decoder.decode())
    return frames


def describe(exc: BaseException) -> str:
    """A short, stable description of why a connection failed, for counting."""
    if isinstance(exc, Refused):
        return f"refused {exc}"
    if isinstance(exc, InvalidStatus):
        return f"http {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        return f"closed {exc.rcvd.code if exc.rcvd else 'abnormally'}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return f"os {exc.strerror or exc}"
    return type(exc).__name__


def close_info(ws: ClientConnection) -> str:
    """How a session ended: its close code and reason, e.g. ``"4410 idle_timeout"``."""
    return f"{ws.close_code} {ws.close_reason or ''}".strip()


def pause_collector() -> None:
    """Keep this process's garbage collector out of a measured phase.

    A full pass of the collector stops the load generator for milliseconds; paused in the
    recipient's loop, it would be counted as the server's latency. Phases last seconds, so
    the cyclic garbage they leave is collected when they end (:func:`resume_collector`).
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def resume_collector() -> None:
    """Undo :func:`pause_collector` once a phase is over."""
    gc.enable()
    gc.unfreeze()
    gc.collect()


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def acks(upto: int, read: bool = True) -> bytes:
    """One message with the cumulative acknowledgements a client sends: delivered, and
    read when ``read``."""
    delivered = cbor2.dumps({"t": "ack", "status": "delivered", "upto": upto})
    if not read:
        return delivered
    return delivered + cbor2.dumps({"t": "ack", "status": "read", "upto": upto})


class Pair:
    """A sender session and a recipient session; the sender sends to the recipient.

    The recipient's session is None while the recipient is offline (``pairs`` with
    ``offline``); ``login`` is then what opens it later: its URL and token.
    """

    def __init__(self, sender: ClientConnection, recipient: ClientConnection | None,
                 recipient_name: str, login: tuple[str, str] | None = None) -> None:
        self.sender = sender
        self.recipient = recipient
        self.to = recipient_name
        self.login = login
        self.counter = 0
        self.inflight = 0
        #: Send stamps (perf_counter_ns) of the sends awaiting ``sent``, by id, when tracking.
        self.stamps: dict[str, int] = {}

    def sends(self, count: int, pad: str, track: bool = False) -> bytes:
        """``count`` send frames, stamped now, as one WebSocket message; ``track`` keeps
        each one's stamp until its ``sent`` arrives."""
        stamp = time.perf_counter_ns()
        parts = []
        for _ in range(count):
            self.counter += 1
            ident = f"m{self.counter}"
            if track:
                self.stamps[ident] = stamp
            parts.append(cbor2.dumps({"t": "send", "id": ident, "to": self.to,
                                      "body": f"{stamp:020d}{pad}"}))
        return b"".join(parts)


class Worker:
    """The state of one load-generator process and its commands (``cmd_*``)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.idle: list[ClientConnection] = []
        self.pairs: list[Pair] = []
        self.readers: set[asyncio.Task[None]] = set()
        self.pacers: set[asyncio.Task[None]] = set()
        self.mode = ""
        self.window = 0
        self.batch = False
        self.pad = "x" * (BODY - 20)
        self.track = False  # record send-to-sent latency
        self.read = True  # recipients acknowledge as read too
        self.ack_receipts = False  # senders acknowledge their receipts
        self.closing = False
        self.done = 0
        self.started = 0  # sessions ever started: numbers the source addresses
        #: Frames that came in the same WebSocket message as a session's welcome (a
        #: backlog may start there), for its reader.
        self.early: dict[ClientConnection, list[dict[str, Any]]] = {}
        self.hist = Histogram()  # send to deliver, in the recipient
        self.sent_hist = Histogram()  # send to sent, in the sender
        self.stats: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.max_lag_ns = 0

    # -- sessions ---------------------------------------------------------------------

    def source(self, i: int) -> str:
        """A loopback source address: spread so no address has many handshakes at once."""
        return f"127.{10 + self.index % 200}.{i // 250 % 250}.{i % 250 + 1}"

    async def session(self, url: str, token: str, i: int, timeout: float) -> ClientConnection:
        ws = await connect(url, compression=None, max_size=None, ping_interval=None,
                           close_timeout=2, open_timeout=timeout, proxy=None,
                           user_agent_header=None, local_addr=(self.source(i), 0))
        try:
            await ws.send(cbor2.dumps({"t": "hello", "versions": [1], "token": token}))
            first, *rest = decode(await asyncio.wait_for(ws.recv(), timeout))
            if first.get("t") != "welcome":
                raise Refused(first.get("code", first.get("t")))
        except BaseException:
            ws.transport.abort()
            raise
        if rest:
            self.early[ws] = rest
        return ws

    async def open_many(self, logins: list[tuple[str, str]], concurrency: int,
                        timeout: float) -> tuple[list[ClientConnection | None], Counter[str]]:
        """Open sessions (``(url, token)`` each) with at most ``concurrency`` handshakes in
        flight, with progress."""
        gate = asyncio.Semaphore(concurrency)
        opened: list[ClientConnection | None] = [None] * len(logins)
        failed: Counter[str] = Counter()
        self.done, base = 0, self.started
        self.started += len(logins)

        async def one(i: int, url: str, token: str) -> None:
            async with gate:
                try:
                    opened[i] = await self.session(url, token, base + i, timeout)
                except Exception as exc:
                    failed[describe(exc)] += 1
                finally:
                    self.done += 1

        ticker = asyncio.create_task(self.tick())
        try:
            await asyncio.gather(*(one(i, u, t) for i, (u, t) in enumerate(logins)))
        finally:
            ticker.cancel()
        return opened, failed

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            emit({"type": "progress", "done": self.done})

    async def cmd_connect(self, url: str, users: list[list[str]], concurrency: int = 200,
                          open_timeout: float = 30.0, retries: int = 0) -> dict[str, Any]:
        """Open idle sessions; those that failed are tried again, up to ``retries`` more
        passes once the previous pass is over, as a client reconnects. ``failed`` counts
        what failed in the end, ``failed_first`` what failed on the first attempt."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100
        if len(self.idle) + len(users) > limit:
            raise ValueError(f"this worker can hold at most {limit} sessions (RLIMIT_NOFILE)")
        cpu, start = time.process_time(), time.monotonic()
        logins = [(url, token) for _, token in users]
        opened, failed = await self.open_many(logins, concurrency, open_timeout)
        first = failed
        for _ in range(retries):
            again = [at for at, ws in enumerate(opened) if ws is None]
            if not again:
                break
            reopened, failed = await self.open_many([logins[at] for at in again],
                                                    concurrency, open_timeout)
            for at, ws in zip(again, reopened, strict=True):
                opened[at] = ws
        self.idle.extend(ws for ws in opened if ws is not None)
        return {"connected": sum(ws is not None for ws in opened), "failed": dict(failed),
                "failed_first": dict(first), "elapsed": time.monotonic() - start,
                "cpu": time.process_time() - cpu}

    async def cmd_pairs(self, url: str, pairs: list[list[str]], concurrency: int = 100,
                        open_timeout: float = 30.0, offline: bool = False) -> dict[str, Any]:
        """Open ``[sender, s_token, recipient, r_token(, s_url, r_url)]`` pairs and start
        reading them; with ``offline``, only the senders (see :meth:`cmd_backlog`)."""
        recipients = [(p[5] if len(p) > 5 else url, p[3]) for p in pairs]
        logins = ([] if offline else recipients) + [(p[4] if len(p) > 4 else url, p[1])
                                                    for p in pairs]
        opened, failed = await self.open_many(logins, concurrency, open_timeout)
        if failed:
            for ws in opened:
                if ws is not None:
                    ws.transport.abort()
            raise RuntimeError(f"could not open every pair session: {dict(failed)}")
        senders = opened[len(logins) - len(pairs):]
        for k, pair_spec in enumerate(pairs):
            recipient_ws, sender_ws = None if offline else opened[k], senders[k]
            assert sender_ws is not None and (offline or recipient_ws is not None)
            pair = Pair(sender_ws, recipient_ws, pair_spec[2], recipients[k])
            self.pairs.append(pair)
            self.start_reader(self.read_sender(pair))
            if recipient_ws is not None:
                self.start_reader(self.read_recipient(pair))
        return {"connected": len(logins)}

    def start_reader(self, reader: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(reader)
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)

    async def cmd_backlog(self, limit: float = 30.0, concurrency: int = 100,
                          open_timeout: float = 30.0) -> dict[str, Any]:
        """Open the sessions of the recipients still offline and wait (at most ``limit``
        seconds) until every message answered ``sent`` has been delivered: the backlog the
        server streams on login. Sending must have stopped and been answered first."""
        waiting = [p for p in self.pairs if p.recipient is None and p.login is not None]
        start, cpu = time.monotonic(), time.process_time()
        before = self.stats["delivered"]
        opened, failed = await self.open_many([p.login for p in waiting if p.login],
                                              concurrency, open_timeout)
        if failed:
            raise RuntimeError(f"could not open every recipient session: {dict(failed)}")
        for pair, ws in zip(waiting, opened, strict=True):
            pair.recipient = ws
            self.start_reader(self.read_recipient(pair))
        while (time.monotonic() - start < limit
               and self.stats["delivered"] < self.stats["sent"]):
            await asyncio.sleep(0.01)
        return {"elapsed": time.monotonic() - start, "cpu": time.process_time() - cpu,
                "delivered": self.stats["delivered"] - before,
                "missing": max(self.stats["sent"] - self.stats["delivered"], 0)}

    # -- readers ----------------------------------------------------------------------

    def frame_error(self, frame: dict[str, Any]) -> None:
        self.errors[str(frame.get("code"))] += 1

    def lost(self, ws: ClientConnection) -> None:
        if not self.closing:
            self.closed[close_info(ws)] += 1

    async def read_recipient(self, pair: Pair) -> None:
        ws = pair.recipient
        assert ws is not None
        try:
            if early := self.early.pop(ws, None):  # a backlog may begin with the welcome
                await self.received(ws, early, time.perf_counter_ns())
            async for data in ws:
                now = time.perf_counter_ns()  # as the message is taken, before decoding it
                await self.received(ws, decode(data), now)
        except ConnectionClosed:
            pass
        self.lost(ws)

    async def received(self, ws: ClientConnection, frames: list[dict[str, Any]],
                       now: int) -> None:
        """A recipient's WebSocket message, decoded at ``now``: record each ``msg``'s
        latency, then acknowledge them all in one message."""
        count = top = 0
        hist = self.hist
        for frame in frames:
            kind = frame["t"]
            if kind == "msg":
                count += 1
                top = max(top, frame["seq"])
                hist.record((now - int(frame["body"][:20])) // 1000)
            elif kind == "error":
                self.frame_error(frame)
        if count:
            self.stats["delivered"] += count
            self.stats["ack_messages"] += 1
            await ws.send(acks(top, self.read))

    async def read_sender(self, pair: Pair) -> None:
        ws, stats, stamps, hist = pair.sender, self.stats, pair.stamps, self.sent_hist
        try:
            async for data in ws:
                now = time.perf_counter_ns()
                sent = receipt = 0
                for frame in decode(data):
                    kind = frame["t"]
                    if kind == "sent":
                        sent += 1
                        if stamps and (stamp := stamps.pop(frame["id"], None)) is not None:
                            hist.record((now - stamp) // 1000)
                    elif kind == "receipt":
                        stats["receipt_frames"] += 1
                        stats[f"receipts_{frame['status']}"] += len(frame["ids"])
                        receipt = frame["seq"]
                    elif kind == "error":
                        self.frame_error(frame)
                if receipt and self.ack_receipts:
                    await ws.send(acks(receipt, read=False))
                if sent:
                    stats["sent"] += sent
                    pair.inflight -= sent
                    if self.mode == "throughput" and pair.inflight < self.window:
                        await self.refill(pair)
        except ConnectionClosed:
            pass
        self.lost(ws)

    # -- load -------------------------------------------------------------------------

    async def refill(self, pair: Pair) -> None:
        """Send as many messages as the window allows: one per WebSocket message, as
        independent clients do, or all in one message when batching."""
        more = self.window - pair.inflight
        pair.inflight += more
        self.stats["sends"] += more
        if self.batch:
            await pair.sender.send(pair.sends(more, self.pad, self.track))
        else:
            for _ in range(more):
                await pair.sender.send(pair.sends(1, self.pad, self.track))

    async def cmd_throughput(self, window: int = 8, batch: bool = False, body: int = BODY,
                             track: bool = False, read: bool = True,
                             ack_receipts: bool = False) -> dict[str, Any]:
        """Keep ``window`` sends awaiting ``sent`` per sender; bodies of ``body``
        characters; ``track`` records send-to-sent latency; ``read``: recipients
        acknowledge as read too; ``ack_receipts``: senders acknowledge receipts."""
        if body < 20:
            raise ValueError("a body holds at least its 20-digit stamp")
        pause_collector()
        self.read, self.ack_receipts = read, ack_receipts
        self.mode, self.window, self.batch = "throughput", window, batch
        self.pad, self.track = "x" * (body - 20), track
        for pair in self.pairs:
            await self.refill(pair)
        return {"started": len(self.pairs)}

    async def cmd_latency(self, rate: float) -> dict[str, Any]:
        """Send ``rate`` messages/s in all, each pair an equal share on its own schedule."""
        if not self.pairs or rate <= 0:
            return {"started": 0}
        pause_collector()
        self.mode, self.pad, self.track = "latency", "x" * (BODY - 20), True
        interval = int(1e9 * len(self.pairs) / rate)
        start = time.perf_counter_ns() + 10_000_000
        for k, pair in enumerate(self.pairs):
            offset = start + k * interval // len(self.pairs)
            task = asyncio.create_task(self.pace(pair, offset, interval))
            self.pacers.add(task)
            task.add_done_callback(self.pacers.discard)
        return {"started": len(self.pairs), "interval_ms": interval / 1e6}

    async def pace(self, pair: Pair, start: int, interval: int) -> None:
        due, stats = start, self.stats
        with contextlib.suppress(ConnectionClosed):
            while self.mode == "latency":
                delay = due - time.perf_counter_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                else:
                    self.max_lag_ns = max(self.max_lag_ns, -delay)
                stats["sends"] += 1
                await pair.sender.send(pair.sends(1, self.pad, True))
                due += interval

    async def cmd_mark(self, hist: str = "") -> dict[str, Any]:
        """Counters so far; ``hist`` "reset" clears the histograms (send to deliver, send
        to sent), "take" returns (``hist``, ``sent_hist``) and clears them."""
        closed = self.closed + Counter(close_info(ws) for ws in self.idle
                                       if ws.state is not State.OPEN)
        reply: dict[str, Any] = {
            "cpu": time.process_time(), "clock": time.monotonic(), "stats": dict(self.stats),
            "errors": dict(self.errors), "closed": dict(closed),
            "idle_open": sum(ws.state is State.OPEN for ws in self.idle),
            "max_lag_ms": self.max_lag_ns / 1e6}
        if hist == "take":
            reply["hist"] = self.hist.to_json()
            reply["sent_hist"] = self.sent_hist.to_json()
        if hist:
            self.hist.clear()  # in place: the readers hold a reference to them
            self.sent_hist.clear()
            self.max_lag_ns = 0
        return reply

    async def cmd_stop(self) -> dict[str, Any]:
        resume_collector()
        self.mode, self.track = "", False
        for task in tuple(self.pacers):
            task.cancel()
        await asyncio.gather(*self.pacers, return_exceptions=True)
        return {"stopped": True}

    async def cmd_drain(self, limit: float = 10.0,
                        keys: list[str] | None = None) -> dict[str, Any]:
        """After ``stop``: wait until every send is answered, delivered and receipted (only
        the parts of :meth:`outstanding` that ``keys`` names, when given)."""
        def missing() -> dict[str, int]:
            return {k: v for k, v in self.outstanding().items() if keys is None or k in keys}

        start = time.monotonic()
        while time.monotonic() - start < limit and missing():
            await asyncio.sleep(0.05)
        return {"elapsed": time.monotonic() - start, "outstanding": missing()}

    def outstanding(self) -> dict[str, int]:
        """Sends not yet answered (``sent``), delivered, or receipted as delivered and read."""
        stats = self.stats
        missing = {"sent": stats["sends"] - stats["sent"],
                   "delivered": stats["sends"] - stats["delivered"],
                   "receipts_delivered": stats["delivered"] - stats["receipts_delivered"],
                   "receipts_read": stats["delivered"] - stats["receipts_read"]}
        return {k: v for k, v in missing.items() if v}

    async def cmd_close(self, limit: float = 5.0) -> dict[str, Any]:
        """Close every session (a proper close handshake, aborting any that stalls)."""
        await self.cmd_stop()
        self.closing = True
        sessions = self.idle + [ws for p in self.pairs for ws in (p.sender, p.recipient)
                                if ws is not None]
        gate = asyncio.Semaphore(500)

        async def close(ws: ClientConnection) -> None:
            async with gate:
                try:
                    await asyncio.wait_for(ws.close(), limit)
                except Exception:
                    ws.transport.abort()

        start = time.monotonic()
        await asyncio.gather(*(close(ws) for ws in sessions))
        for task in tuple(self.readers):
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.idle, self.pairs, self.closing = [], [], False
        return {"closed": len(sessions), "elapsed": time.monotonic() - start}

    async def cmd_quit(self) -> dict[str, Any]:
        for ws in self.idle + [ws for p in self.pairs for ws in (p.sender, p.recipient)
                               if ws is not None]:
            ws.transport.abort()
        return {"bye": True}


async def serve(worker: Worker) -> None:
    """Read commands from stdin until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        request = json.loads(line)
        name = request.pop("cmd")
        try:
            result = await getattr(worker, f"cmd_{name}")(**request)
        except Exception as exc:
            emit({"type": "reply", "error": f"{type(exc).__name__}: {exc}"})
        else:
            emit({"type": "reply", **result})
        if name == "quit":
            return
    await worker.cmd_quit()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--worker", type=int, default=0, help="worker number (source addresses)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(Worker(args.worker)))


if __name__ == "__main__":
    main()
