"""The scenarios, each run against a fresh server process of one target (or fresh chatd
nodes on fresh nats-servers).

1. :func:`connections`: N authenticated idle sessions, held for a while: connect rate,
   server RSS per connection and idle CPU.
2. :func:`throughput`: P sender/recipient pairs as fast as the server allows, with
   delivered and read receipts: messages per second and server CPU per routed message.
3. :func:`latency`: the same pairs at a fixed offered load: send-to-deliver and
   send-to-``sent`` latency percentiles from HDR-style histograms merged over the workers.
4. :func:`flood`: one sender with 256 sends outstanding, 1 KB bodies, to a recipient who is
   offline: messages answered ``sent`` per second, server CPU and RSS growth per queued
   message; then the recipient logs in and the backlog's streaming rate is measured.
5. :func:`sla`: the latency scenario's pairs at paced rates searched by doubling, then
   bisecting: the highest rate at which p99.99 of send-to-``sent`` and of send-to-deliver
   both stay within 5 ms (issue 14's goal 5).
6. :func:`nats_throughput`: the throughput scenario on chatd with its embedded durable
   store, on one chatd node on one nats-server, and on two chatd nodes on three
   nats-servers (every pair crossing nodes, see :func:`place`): messages per second, and
   CPU per message for chatd and for the nats-servers apart.
7. :func:`benchmarks.scale.scale` (its own module): 100,000 idle sessions on
   ``chatd serve --workers 8``: RSS per connection, idle CPU and open files per process.

Server CPU and RSS are sampled from ``/proc`` just before and just after each measured
window (summed over the chatd nodes, and per node; the nats-servers apart); the load
generator's own CPU over the same window is reported beside it.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from benchmarks.hdr import Histogram
from benchmarks.loadgen import MAX_SESSIONS
from benchmarks.natsdeploy import NatsDeployment
from benchmarks.servers import BenchError, Sample, Server
from benchmarks.workers import Pool, Progress

__all__ = ["FLOOD_SETTINGS", "NATS_SETUPS", "WARNINGS", "Params", "Tokens", "connections",
           "flood", "latency", "nats_throughput", "next_rate", "place", "remembered", "sla",
           "throughput", "warn"]

#: What the scenarios run against: one server, or chatd nodes on nats-servers (one URL
#: per node).
Target = Server | NatsDeployment
#: The deployments of :func:`nats_throughput`: (chatd nodes, nats-servers).
NATS_SETUPS = ((1, 1), (2, 3))

#: Everything :func:`warn` said during the run, repeated under the final table.
WARNINGS: list[str] = []
#: The chatd settings of the flood scenario's servers: flood control (default 500 frames/s
#: per connection, burst 2000) out of the way, so that the store and the routing are what
#: is measured, not the budget (a deployment that takes bulk imports raises it the same way).
FLOOD_SETTINGS: dict[str, int | float] = {"rate_limit": 1_000_000.0, "rate_burst": 1_000_000}
#: The SLA search stops bisecting when the lowest failing rate is within this factor of
#: the highest passing one.
SLA_PRECISION = 1.1


def warn(message: str) -> None:
    """Say something the reader must not miss: on stderr now, and again after the table
    (once: a message already said is not repeated)."""
    if message in WARNINGS:
        return
    WARNINGS.append(message)
    print(f"  !!! {message}", file=sys.stderr, flush=True)


#: Seconds allowed per thousand sessions to open (on top of a fixed allowance).
_OPEN_SECONDS_PER_1000 = 30.0


@attrs.frozen
class Params:
    """What one run measures, and for how long (seconds)."""

    connections: int = 19_000
    hold: float = 15.0
    pairs: int = 64
    window: int = 8
    batch: bool = False  # several sends per WebSocket message in the throughput scenario
    seconds: float = 20.0
    # Throughput rounds per target, taken in turn across the targets (A, B, C, A, B, C...)
    # so that the machine's drift over a run falls on every target alike; the median round
    # is reported.
    throughput_rounds: int = 3
    warmup: float = 2.0
    latency_seconds: float = 30.0
    concurrency: int = 200
    workers: int = 2
    drain: float = 10.0  # longest wait for the last messages and receipts after the load
    # The flood scenario: one sender, ``flood_window`` sends outstanding, bodies of
    # ``flood_body`` characters, to an offline recipient; ``flood_seconds`` measured, then
    # at most ``flood_drain`` for the recipient to receive the backlog.
    flood_window: int = 256
    flood_body: int = 1024
    flood_seconds: float = 10.0
    flood_drain: float = 60.0
    # The SLA capacity search: steps of ``sla_warmup`` + ``sla_seconds`` at paced rates from
    # ``sla_start`` msg/s, within ``sla_budget`` seconds per target; the bound on both
    # p99.99s is ``sla_bound_ms``.
    sla_start: float = 250.0
    sla_seconds: float = 4.0
    sla_warmup: float = 1.0
    sla_budget: float = 40.0
    sla_bound_ms: float = 5.0
    # The ids scenario (issue 15): ``ids_pairs`` pairs send as in the throughput scenario
    # for ``ids_rounds`` rounds of ``ids_seconds``; recipients acknowledge delivery and read
    # nothing, senders acknowledge their receipts, so what the server keeps growing is the
    # memory of message ids (for duplicates) and of unread messages (for read receipts).
    # 128 recipients keep up to 1,280,000 unread (max_unread 10,000 each).
    ids_pairs: int = 128
    ids_rounds: int = 4
    ids_seconds: float = 45.0
    # The scale scenario (benchmarks.scale): ``scale_connections`` idle sessions on
    # ``chatd serve --workers scale_workers``, held ``scale_hold`` seconds (more than
    # chatd's ping interval, 20 s, so that every session is pinged in the window), opened
    # with ``scale_concurrency`` handshakes in flight over all the load generators (with
    # 100 instead of 400, 100,000 sessions opened several times slower on two cores).
    scale_connections: int = 100_000
    scale_workers: int = 8
    scale_hold: float = 30.0
    scale_concurrency: int = 400


class Tokens:
    """Tokens minted once per user from the run's secret, shared by every target."""

    def __init__(self, secret: bytes) -> None:
        from chatd.auth import mint_token  # chatd is only needed here, by the harness

        self._mint = mint_token
        self._secret = secret
        self._cache: dict[str, str] = {}

    def __call__(self, user: str) -> str:
        token = self._cache.get(user)
        if token is None:
            token = self._cache[user] = self._mint(self._secret, user, 7 * 86400.0)
        return token


def _split(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into ``parts`` contiguous shares as equal as possible."""
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def _pct(cpu: float, seconds: float) -> float:
    """CPU seconds over a wall-clock window, as a percentage of one core."""
    return round(100.0 * cpu / seconds, 1) if seconds > 0 else 0.0


def _merge(marks: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for mark in marks:
        total.update(mark.get(key, {}))
    return dict(total)


def _stat(marks: list[dict[str, Any]], name: str) -> int:
    return sum(int(mark["stats"].get(name, 0)) for mark in marks)


def _loadgen_cpu(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    return sum(float(a["cpu"]) - float(b["cpu"]) for a, b in zip(after, before, strict=True))


def _server_pct(s0: Sample, s1: Sample) -> float:
    return _pct(s1.cpu - s0.cpu, s1.clock - s0.clock)


def _backend_cpu(s0: Sample, s1: Sample) -> float:
    """CPU seconds the server's backend processes (nats-servers) used between two samples."""
    return s1.backend.cpu - s0.backend.cpu if s0.backend and s1.backend else 0.0


def _machine(server: Target, s0: Sample, s1: Sample, loadgen_cpu: float) -> dict[str, float]:
    """The whole machine's CPU over a window, and what neither side of the benchmark used
    (other processes; the kernel's softirq work for loopback traffic is shown apart; the
    nats-servers count as the server's side).

    A loud warning if other processes used more than a fifth of a core: the figures of
    that window are then unreliable.
    """
    window = s1.clock - s0.clock
    softirq = s1.softirq - s0.softirq
    other = ((s1.machine_busy - s0.machine_busy) - (s1.cpu - s0.cpu) - _backend_cpu(s0, s1)
             - loadgen_cpu - softirq)
    figures = {"machine_cpu_pct": _pct(s1.machine_busy - s0.machine_busy, window),
               "softirq_cpu_pct": _pct(softirq, window), "other_cpu_pct": _pct(other, window)}
    if figures["other_cpu_pct"] > 20.0:
        warn(f"{server.target}: other processes used {figures['other_cpu_pct']:.0f} % of a "
             "core during a measurement: its figures are unreliable")
    return figures


def _problems(server: Target, when: str) -> dict[str, int]:
    """Warnings and errors the server's processes logged since the last look, counted per
    process, with a warning quoting the first (only chatd on NATS is watched)."""
    found = server.problems()
    for name, lines in found.items():
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        warn(f"{server.target}: {name} logged {when}: {lines[0]}{more}")
    return {name: len(lines) for name, lines in found.items()}


async def connections(server: Server, params: Params, tokens: Tokens,
                      logdir: Path) -> dict[str, Any]:
    """Open ``params.connections`` idle sessions, hold them, close them."""
    n = params.connections
    size = max(params.workers, math.ceil(n / MAX_SESSIONS))
    shares = _split(n, size)
    async with Pool(size, logdir) as pool:
        await pool[0].request("connect", url=server.url, users=[["idle-warm",
                                                                   tokens("idle-warm")]])
        await asyncio.sleep(0.5)
        before = server.sample()
        per_worker = [{"users": [[f"idle-{w}-{i}", tokens(f"idle-{w}-{i}")] for i in share]}
                      for w, share in enumerate(shares)]
        bar = Progress(f"{server.target}: connecting", n, " sessions")
        replies = await pool.all("connect", per_worker, url=server.url,
                                 concurrency=params.concurrency,
                                 timeout=30.0 + _OPEN_SECONDS_PER_1000 * n / 1000,
                                 on_progress=lambda: bar.update(pool.done))
        opened = server.sample()
        elapsed = opened.clock - before.clock
        connected = sum(r["connected"] for r in replies)
        failed = _merge(replies, "failed")
        bar.finish(f"{connected:,} open, {connected / elapsed:,.0f}/s"
                   + (f", FAILED: {failed}" if failed else ""))
        if not connected:
            raise BenchError(f"{server.target}: no session could be opened: {failed}")
        open_cpu = sum(r["cpu"] for r in replies)
        marks0 = await pool.all("mark")
        held0 = server.sample()
        hold = Progress(f"{server.target}: holding {connected:,} idle", params.hold, "s")
        await hold.sleep(params.hold, server.check)
        held1 = server.sample()
        marks1 = await pool.all("mark")
        hold.finish()
        still_open = sum(m["idle_open"] for m in marks1) - 1  # minus the warm-up session
        result = {
            "connections": connected, "requested": n, "failed": failed,
            "open_at_end": still_open, "closed": _merge(marks1, "closed"),
            "connect_s": round(elapsed, 2), "connect_per_s": round(connected / elapsed, 1),
            "connect_server_cpu_pct": _server_pct(before, opened),
            "connect_loadgen_cpu_pct": _pct(open_cpu, elapsed),
            "rss_kb_before": before.rss_kb, "rss_kb_after": held1.rss_kb,
            "rss_kb_per_conn": round((held1.rss_kb - before.rss_kb) / connected, 2),
            "hold_s": round(held1.clock - held0.clock, 2),
            "idle_cpu_pct": _server_pct(held0, held1),
            "idle_loadgen_cpu_pct": _pct(_loadgen_cpu(marks0, marks1), held1.clock - held0.clock),
            **_machine(server, held0, held1, _loadgen_cpu(marks0, marks1)),
            "workers": size,
            **{f"connect_{k}": v for k, v in _machine(server, before, opened, open_cpu).items()},
        }
        closing = await pool.all("close", timeout=60.0 + n / 100)
        result["close_s"] = round(max(r["elapsed"] for r in closing), 2)
    return result


def place(i: int, nodes: int) -> tuple[int, int]:
    """The nodes (from 0) of pair ``i``'s sender and recipient when there are ``nodes``:
    the sender on node ``i % nodes``, the recipient on the next node, so every pair crosses
    nodes and every node holds as many senders as recipients."""
    return i % nodes, (i + 1) % nodes


async def _open_pairs(server: Target, pool: Pool, params: Params, tokens: Tokens) -> list[int]:
    """Open the pairs, pair ``i`` in worker ``i % size``; returns pairs per worker.

    With several chatd nodes, each user goes to the node :func:`place` chooses.
    """
    size, urls = len(pool), server.urls
    per_worker: list[dict[str, Any]] = [{"pairs": []} for _ in range(size)]
    for i in range(params.pairs):
        pair = [f"s{i}", tokens(f"s{i}"), f"r{i}", tokens(f"r{i}")]
        if len(urls) > 1:
            sender, recipient = place(i, len(urls))
            pair += [urls[sender], urls[recipient]]
        per_worker[i % size]["pairs"].append(pair)
    await pool.all("pairs", per_worker, url=server.url, timeout=60.0)
    return [len(p["pairs"]) for p in per_worker]


def _traffic(server: Target, pairs: int, marks0: list[dict[str, Any]],
             marks1: list[dict[str, Any]], s0: Sample, s1: Sample) -> dict[str, Any]:
    """What happened between two marks: messages, receipts, CPU on both sides, errors."""
    window = s1.clock - s0.clock
    delivered = _stat(marks1, "delivered") - _stat(marks0, "delivered")
    cpu = s1.cpu - s0.cpu
    errors = _merge(marks1, "errors")
    closed = _merge(marks1, "closed")
    if errors or closed:
        loud = "rate_limited" in errors
        warn(f"{server.target}: server errors {errors or '-'}, sessions lost {closed or '-'}"
             + (" (the server throttled the load generator: use more --pairs or a smaller "
                "--window)" if loud else ""))
    acks = _stat(marks1, "ack_messages") - _stat(marks0, "ack_messages")
    sends = _stat(marks1, "sends") - _stat(marks0, "sends")
    problems = _problems(server, "by the end of a measured window")
    return ({"log_warnings": problems} if problems else {}) | {
        "window_s": round(window, 2), "delivered": delivered,
        "msgs_per_s": round(delivered / window, 1) if window > 0 else 0.0,
        "sent": _stat(marks1, "sent") - _stat(marks0, "sent"),
        "receipts_delivered": (_stat(marks1, "receipts_delivered")
                               - _stat(marks0, "receipts_delivered")),
        "receipts_read": _stat(marks1, "receipts_read") - _stat(marks0, "receipts_read"),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu * 1e6 / delivered, 2) if delivered else None,
        # How many messages one write to a recipient carried, and the server's young
        # garbage collections per message: what the metrics' cost depends on.
        "msgs_per_write": round(delivered / acks, 2) if acks else None,
        "gc_collections_per_msg": _collections_per_msg(s0, s1, delivered / window
                                                       if window > 0 else 0.0),
        "server_cpu_pct": _pct(cpu, window),
        "loadgen_cpu_pct": _pct(_loadgen_cpu(marks0, marks1), window),
        **_machine(server, s0, s1, _loadgen_cpu(marks0, marks1)),
        # Frames/s per connection on the busier side (chatd allows 500 by default).
        "frames_per_s_per_conn": round(max(sends, 2 * acks) / pairs / window, 1) if window else 0,
        "errors": errors, "closed": closed,
    } | ({"nodes": [{"node": f"n{k + 1}", "server_cpu_s": round(b.cpu - a.cpu, 3),
                     "server_cpu_pct": _pct(b.cpu - a.cpu, window), "rss_kb": b.rss_kb}
                    for k, (a, b) in enumerate(zip(s0.parts, s1.parts, strict=True))]}
         if s0.parts else {}) | _nats_figures(s0, s1, cpu, delivered)


def _nats_figures(s0: Sample, s1: Sample, chatd_cpu: float, delivered: int) -> dict[str, Any]:
    """The nats-servers' CPU over a window, in all and per server (none without them):
    ``nats_cpu_us_per_msg``, and ``total_cpu_us_per_msg`` for chatd and NATS together."""
    if s0.backend is None or s1.backend is None:
        return {}
    window = s1.clock - s0.clock
    cpu = s1.backend.cpu - s0.backend.cpu

    def per_msg(seconds: float) -> float | None:
        return round(seconds * 1e6 / delivered, 2) if delivered else None

    return {"nats_cpu_s": round(cpu, 3), "nats_cpu_us_per_msg": per_msg(cpu),
            "nats_cpu_pct": _pct(cpu, window), "nats_rss_kb": s1.backend.rss_kb,
            "total_cpu_us_per_msg": per_msg(chatd_cpu + cpu),
            "nats": [{"server": f"nats-{k + 1}", "cpu_s": round(b.cpu - a.cpu, 3),
                      "cpu_pct": _pct(b.cpu - a.cpu, window), "rss_kb": b.rss_kb}
                     for k, (a, b) in enumerate(zip(s0.backend.parts, s1.backend.parts,
                                                    strict=True))]}


async def _drain(server: Target, pool: Pool, timeout: float,
                 keys: list[str] | None = None) -> dict[str, Any]:
    """Stop sending and wait until every message is answered, delivered and receipted (only
    the parts ``keys`` names, when given: see the load generator's ``outstanding``)."""
    await pool.all("stop")
    replies = await pool.all("drain", timeout=timeout + 30.0, limit=timeout, keys=keys)
    outstanding = _merge(replies, "outstanding")
    if outstanding:
        warn(f"{server.target}: {timeout:.0f} s after the load stopped, still missing: "
             f"{outstanding}")
    return {"drain_s": round(max(r["elapsed"] for r in replies), 2),
            "outstanding": outstanding}


@attrs.frozen
class Window:
    """A measured window: the workers' marks and the server's samples at both ends."""

    marks0: list[dict[str, Any]]
    marks1: list[dict[str, Any]]
    s0: Sample
    s1: Sample
    bar: Progress


async def _measure(server: Target, pool: Pool, params: Params, scenario: str, label: str,
                   seconds: float, hist: str = "", warmup: float | None = None) -> Window:
    """Warm up (``params.warmup`` unless ``warmup`` is given), then measure ``seconds`` of
    the load already started on ``pool``.

    A non-empty ``hist`` also clears the workers' histograms at the start and collects
    them at the end (the end marks then carry them).
    """
    warmup = params.warmup if warmup is None else warmup
    warm = Progress(f"{server.target}: {scenario} warm-up", warmup, "s")
    await warm.sleep(warmup, server.check)
    # The garbage collections are scraped from the server outside the window: a busy chatd
    # may take a second to answer, which must not come between a mark and a sample.
    gc0 = server.young_collections()
    marks0 = await pool.all("mark", hist="reset" if hist else "")
    s0 = server.sample()
    bar = Progress(f"{server.target}: {label}", seconds, "s")
    await bar.sleep(seconds, server.check)
    s1 = server.sample()
    marks1 = await pool.all("mark", hist="take" if hist else "")
    gc1 = server.young_collections()
    if gc0 is not None and gc1 is not None:
        (s0.gc_young, s0.gc_clock), (s1.gc_young, s1.gc_clock) = gc0, gc1
    return Window(marks0, marks1, s0, s1, bar)


def _collections_per_msg(s0: Sample, s1: Sample, msgs_per_s: float) -> float | None:
    """The server's young collections per message: their rate between the two scrapes
    (just outside the window) over the window's messages per second."""
    if (s0.gc_young is None or s1.gc_young is None or s0.gc_clock is None
            or s1.gc_clock is None or s1.gc_clock <= s0.gc_clock or not msgs_per_s):
        return None
    return round((s1.gc_young - s0.gc_young) / (s1.gc_clock - s0.gc_clock) / msgs_per_s, 4)


async def throughput(server: Target, params: Params, tokens: Tokens,
                     logdir: Path) -> dict[str, Any]:
    """P pairs sending with a window of W messages awaiting ``sent``; measure D seconds."""
    async with Pool(params.workers, logdir) as pool:
        await _open_pairs(server, pool, params, tokens)
        await pool.all("throughput", window=params.window, batch=params.batch)
        window = await _measure(server, pool, params, "throughput",
                                f"throughput, {params.pairs} pairs", params.seconds)
        result = _traffic(server, params.pairs, window.marks0, window.marks1, window.s0,
                          window.s1)
        result.update(await _drain(server, pool, params.drain))
        window.bar.finish(f"{result['msgs_per_s']:,.0f} msg/s, {result['cpu_us_per_msg']} us/msg")
        result.update(pairs=params.pairs, window=params.window, batch=params.batch)
        await pool.all("close")
    return result


async def remembered(server: Server, params: Params, tokens: Tokens,
                     logdir: Path) -> dict[str, Any]:
    """Memory per remembered message and CPU per message as remembered ids grow (issue 15).

    ``params.ids_pairs`` pairs send as in the throughput scenario; recipients acknowledge
    delivery only (so every message stays unread, up to ``max_unread`` per recipient) and
    senders acknowledge their receipts (so no receipt stays queued). After each of
    ``params.ids_rounds`` rounds of ``params.ids_seconds``: messages routed so far, the
    round's messages/s and CPU per message, the server's RSS and the ids it remembers
    (chatd's ``chatd_message_ids_remembered``). Reported: RSS growth per message routed and
    per remembered id, from the pairs' opening to the end.
    """
    pairs = attrs.evolve(params, pairs=params.ids_pairs)
    async with Pool(params.workers, logdir) as pool:
        await _open_pairs(server, pool, pairs, tokens)
        start = server.sample()
        await pool.all("throughput", window=params.window, batch=params.batch, read=False,
                       ack_receipts=True)
        rounds, routed = [], 0
        for k in range(params.ids_rounds):
            window = await _measure(server, pool, params, "ids",
                                    f"ids, round {k + 1} of {params.ids_rounds}",
                                    params.ids_seconds, warmup=0.0)
            traffic = _traffic(server, params.ids_pairs, window.marks0, window.marks1,
                               window.s0, window.s1)
            routed += traffic["delivered"]
            rounds.append({"messages": routed, "msgs_per_s": traffic["msgs_per_s"],
                           "cpu_us_per_msg": traffic["cpu_us_per_msg"],
                           "rss_kb": window.s1.rss_kb, "ids": server.remembered_ids()})
            window.bar.finish(f"{routed:,} routed, {traffic['cpu_us_per_msg']} us/msg, "
                              f"RSS {window.s1.rss_kb / 1024:,.0f} MiB")
        drained = await _drain(server, pool, params.drain,
                               keys=["sent", "delivered", "receipts_delivered"])
        end = server.sample()
        await pool.all("close")
    grown = (end.rss_kb - start.rss_kb) * 1024
    ids = server.remembered_ids()
    return {"pairs": params.ids_pairs, "rounds": rounds, "messages": routed,
            "remembered_ids": ids, "rss_growth_kb": end.rss_kb - start.rss_kb,
            "bytes_per_message": round(grown / routed, 1) if routed else None,
            "bytes_per_id": round(grown / ids, 1) if ids else None, **drained}


async def latency(server: Target, params: Params, tokens: Tokens, logdir: Path,
                  rate: float) -> dict[str, Any]:
    """The pairs at ``rate`` messages/s in all; the send-to-deliver latency histogram."""
    async with Pool(params.workers, logdir) as pool:
        shares = await _open_pairs(server, pool, params, tokens)
        await pool.all("latency", [{"rate": rate * k / params.pairs} for k in shares])
        window = await _measure(server, pool, params, "latency",
                                f"latency at {rate:,.0f} msg/s", params.latency_seconds,
                                hist="take")
        marks1, bar = window.marks1, window.bar
        histogram, sent_histogram = _histograms(marks1)
        result = _traffic(server, params.pairs, window.marks0, marks1, window.s0, window.s1)
        result.update(await _drain(server, pool, params.drain))
        result.update(offered_per_s=round(rate, 1), samples=histogram.total,
                      max_send_lag_ms=round(max(m["max_lag_ms"] for m in marks1), 3),
                      latency_ms=percentiles(histogram), histogram=histogram.to_json(),
                      sent_samples=sent_histogram.total,
                      sent_latency_ms=percentiles(sent_histogram),
                      sent_histogram=sent_histogram.to_json())
        bar.finish(f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} "
                   f"ms (to sent: {result['sent_latency_ms']['p50']}, "
                   f"{result['sent_latency_ms']['p99']}), {histogram.total:,} samples")
        # Messages sent but not yet delivered when the window ended: at a load the server
        # sustains, about rate x latency; a backlog of 100 ms of load or more is queueing.
        backlog = _stat(marks1, "sends") - _stat(marks1, "delivered")
        result["backlog_at_end"] = backlog
        if result["msgs_per_s"] < 0.95 * rate or backlog > 0.1 * rate:
            result["overloaded"] = True
            warn(f"{server.target}: delivered {result['msgs_per_s']:,.0f} msg/s of the "
                 f"{rate:,.0f} offered, {backlog:,} messages still undelivered at the end: "
                 "overloaded, the latency is mostly queueing")
        if histogram.total < 10_000:
            result["note"] = (f"only {histogram.total} samples: p99.99 is close to the maximum")
        await pool.all("close")
    return result


def _histograms(marks: list[dict[str, Any]]) -> tuple[Histogram, Histogram]:
    """The workers' send-to-deliver and send-to-sent histograms, each merged."""
    deliver, sent = Histogram(), Histogram()
    for mark in marks:
        deliver.merge(Histogram.from_json(mark["hist"]))
        sent.merge(Histogram.from_json(mark["sent_hist"]))
    return deliver, sent


async def flood(server: Server, params: Params, tokens: Tokens, logdir: Path) -> dict[str, Any]:
    """One sender keeping ``flood_window`` sends of ``flood_body``-character bodies awaiting
    ``sent``, to a recipient who is offline; then the recipient logs in and takes the backlog.

    Measured over ``flood_seconds`` after the warm-up: ``msgs_per_s`` (answered ``sent``),
    ``cpu_us_per_msg`` (server CPU per answered send), ``rss_kb_per_msg`` (server RSS
    growth per message queued in the window) and ``sent_latency_ms``. Then ``backlog``: the
    recipient's session opened, every queued message streamed to it (it acknowledges as it
    reads): ``msgs_per_s`` and the server's ``cpu_us_per_msg`` over the streaming.
    chatd's servers are started by the caller with :data:`FLOOD_SETTINGS`.
    """
    async with Pool(1, logdir) as pool:
        await pool[0].request("pairs", url=server.url, offline=True, timeout=60.0, pairs=[
            ["flood-s", tokens("flood-s"), "flood-r", tokens("flood-r")]])
        await pool.all("throughput", window=params.flood_window, batch=params.batch,
                       body=params.flood_body, track=True)
        window = await _measure(
            server, pool, params, "flood",
            f"flood, {params.flood_window} outstanding, {params.flood_body} B bodies",
            params.flood_seconds, hist="take")
        s0, s1 = window.s0, window.s1
        result = _traffic(server, 1, window.marks0, window.marks1, s0, s1)
        sent, cpu = result["sent"], s1.cpu - s0.cpu
        _, sent_histogram = _histograms(window.marks1)
        result.update(
            msgs_per_s=round(sent / result["window_s"], 1) if result["window_s"] else 0.0,
            cpu_us_per_msg=round(cpu * 1e6 / sent, 2) if sent else None,
            rss_kb_before=s0.rss_kb, rss_kb_after=s1.rss_kb,
            rss_kb_per_msg=round((s1.rss_kb - s0.rss_kb) / sent, 3) if sent else None,
            gc_collections_per_msg=_collections_per_msg(s0, s1, sent / result["window_s"]
                                                        if result["window_s"] else 0.0),
            sent_latency_ms=percentiles(sent_histogram), sent_samples=sent_histogram.total,
            window=params.flood_window, body_bytes=params.flood_body,
            settings=server.settings if server.target != "peer" else {})
        for key in ("delivered", "receipts_delivered", "receipts_read", "msgs_per_write"):
            result.pop(key, None)  # nobody is online to receive them in the window
        window.bar.finish(f"{result['msgs_per_s']:,.0f} msg/s, {result['cpu_us_per_msg']} "
                          f"us/msg, {result['rss_kb_per_msg']} KiB/msg")
        await pool.all("stop")
        answered = await pool[0].request("drain", limit=params.drain, keys=["sent"],
                                         timeout=params.drain + 30.0)
        if answered["outstanding"]:
            warn(f"{server.target}: flood: {params.drain:.0f} s after the load stopped, "
                 f"sends still unanswered: {answered['outstanding']}")
        result["backlog"] = await _backlog(server, pool, params.flood_drain)
        # Not the read receipts: the recipient's acknowledgements of a backlog arrive in
        # bursts that the server merges, and an "ack read" covering more than max_unread
        # (10,000) messages just delivered forgets the oldest of them first (protocol.md
        # 4.6), so they never get a read receipt, on chatd as on the peer.
        result.update(await _drain(server, pool, params.drain,
                                   keys=["sent", "delivered", "receipts_delivered"]))
        final = await pool.all("mark")
        result["receipts_read_missing"] = _stat(final, "delivered") - _stat(final,
                                                                            "receipts_read")
        await pool.all("close")
    return result


async def _backlog(server: Server, pool: Pool, limit: float) -> dict[str, Any]:
    """The offline recipient logs in: how fast the server streams what was queued."""
    bar = Progress(f"{server.target}: flood backlog to the recipient", limit, "s")
    s0 = server.sample()
    reply = await pool[0].request("backlog", limit=limit, timeout=limit + 60.0)
    s1 = server.sample()
    delivered, elapsed = reply["delivered"], reply["elapsed"]
    figures = {"messages": delivered, "elapsed_s": round(elapsed, 2),
               "msgs_per_s": round(delivered / elapsed, 1) if elapsed > 0 else 0.0,
               "cpu_us_per_msg": (round((s1.cpu - s0.cpu) * 1e6 / delivered, 2) if delivered
                                  else None),
               "server_cpu_pct": _server_pct(s0, s1),
               "loadgen_cpu_pct": _pct(reply["cpu"], elapsed), "missing": reply["missing"]}
    if reply["missing"]:
        warn(f"{server.target}: flood: the recipient received {delivered:,} messages of the "
             f"backlog in {limit:.0f} s, {reply['missing']:,} still missing")
    bar.finish(f"{delivered:,} messages at {figures['msgs_per_s']:,.0f} msg/s")
    return figures


def next_rate(passed: float | None, failed: float | None, floor: float) -> float | None:
    """The SLA search's next rate: double the highest passing rate until one fails, halve
    the lowest failing rate until one passes (None below ``floor``), then bisect until the
    two are within :data:`SLA_PRECISION` of each other (None: done)."""
    if passed is None and failed is None:
        raise ValueError("no step measured yet")
    if failed is None:
        assert passed is not None
        return 2 * passed
    if passed is None:
        return failed / 2 if failed / 2 >= floor else None
    if failed <= passed * SLA_PRECISION:
        return None
    return (passed + failed) / 2


async def sla(server: Server, params: Params, tokens: Tokens, logdir: Path) -> dict[str, Any]:
    """The highest paced rate (messages/s, all pairs) at which p99.99 of send-to-sent and
    of send-to-deliver both stay within ``params.sla_bound_ms``.

    The latency scenario's pairs, opened once; steps of ``sla_warmup`` + ``sla_seconds`` at
    one rate each, the load stopped and drained between steps. From ``sla_start``, the rate
    doubles until a step fails, then bisects (:func:`next_rate`); the search stops when it
    has converged, when even ``sla_start / 8`` fails, when a step cannot be drained, or
    when the next step would not end within ``sla_budget`` seconds. A step fails when a
    p99.99 exceeds the bound or the server does not keep up (as the latency scenario
    judges it). Returns ``capacity_per_s`` (0 if no step passed), the p99.99s at that rate
    (at the lowest rate tried when none passed), and every step under ``steps``.
    """
    bound = params.sla_bound_ms
    async with Pool(params.workers, logdir) as pool:
        shares = await _open_pairs(server, pool, params, tokens)
        start = time.monotonic()
        deadline = start + params.sla_budget
        steps: list[dict[str, Any]] = []
        passed: float | None = None
        failed: float | None = None
        rate: float | None = params.sla_start
        stopped = "converged"
        while rate is not None:
            began = time.monotonic()
            step = await _sla_step(server, pool, params, shares, rate)
            steps.append(step)
            if step["met"]:
                passed = max(passed or 0.0, rate)
            else:
                failed = min(failed or math.inf, rate)
            if step["outstanding"]:
                stopped = "a step's messages could not be drained"
                break
            rate = next_rate(passed, failed, params.sla_start / 8)
            if rate is None and passed is None:
                stopped = f"no rate down to {params.sla_start / 8:,.0f} msg/s met the bound"
            if rate is not None and time.monotonic() + (time.monotonic() - began) > deadline:
                stopped = "time budget used up"
                break
        await pool.all("close")
    best = max((s for s in steps if s["met"]), key=lambda s: s["rate"], default=None)
    shown = best or min(steps, key=lambda s: s["rate"])
    return {"capacity_per_s": best["rate"] if best is not None else 0.0,
            "met": best is not None, "bound_ms": bound,
            "lowest_failed_per_s": round(failed, 1) if failed is not None else None,
            "sent_p99_99_ms": shown["sent_latency_ms"]["p99_99"],
            "deliver_p99_99_ms": shown["latency_ms"]["p99_99"],
            "figures_at_per_s": shown["rate"], "samples": shown["samples"],
            "server_cpu_pct": shown["server_cpu_pct"], "stopped": stopped,
            "search_s": round(time.monotonic() - start, 1), "steps": steps,
            "pairs": params.pairs, "step_seconds": params.sla_seconds}


async def _sla_step(server: Server, pool: Pool, params: Params, shares: list[int],
                    rate: float) -> dict[str, Any]:
    """One step of :func:`sla`: ``rate`` msg/s, measured, then stopped and drained."""
    pauses0 = server.gc_pauses()
    await pool.all("latency", [{"rate": rate * k / params.pairs} for k in shares])
    window = await _measure(server, pool, params, "SLA", f"SLA step at {rate:,.0f} msg/s",
                            params.sla_seconds, hist="take", warmup=params.sla_warmup)
    histogram, sent_histogram = _histograms(window.marks1)
    traffic = _traffic(server, params.pairs, window.marks0, window.marks1, window.s0,
                       window.s1)
    await pool.all("stop")
    limit = max(5.0, 2 * params.sla_seconds)
    drained = await pool.all("drain", limit=limit, timeout=limit + 30.0)
    pauses1 = server.gc_pauses()
    backlog = _stat(window.marks1, "sends") - _stat(window.marks1, "delivered")
    deliver, sent = percentiles(histogram), percentiles(sent_histogram)
    overloaded = traffic["msgs_per_s"] < 0.95 * rate or backlog > 0.1 * rate
    met = (not overloaded and histogram.total > 0 and sent_histogram.total > 0
           and max(deliver["p99_99"], sent["p99_99"]) <= params.sla_bound_ms)
    window.bar.finish(f"p99.99 to sent {sent['p99_99']} ms, to deliver {deliver['p99_99']} ms"
                      + (", overloaded" if overloaded else "") + (": met" if met else
                                                                    ": not met"))
    return {"rate": round(rate, 1), "met": met, "overloaded": overloaded,
            "latency_ms": deliver, "sent_latency_ms": sent, "samples": histogram.total,
            "sent_samples": sent_histogram.total, "delivered_per_s": traffic["msgs_per_s"],
            "backlog_at_end": backlog, "server_cpu_pct": traffic["server_cpu_pct"],
            "loadgen_cpu_pct": traffic["loadgen_cpu_pct"],
            "machine_cpu_pct": traffic["machine_cpu_pct"],
            "other_cpu_pct": traffic["other_cpu_pct"],
            "max_send_lag_ms": round(max(m["max_lag_ms"] for m in window.marks1), 3),
            "outstanding": _merge(drained, "outstanding"),
            "gc_pauses": _gc_during(pauses0, pauses1)}


def _gc_during(before: dict[str, dict[str, float]] | None,
               after: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    """The server's collector pauses between two :meth:`Server.gc_pauses` scrapes, per
    generation (empty for the peer): what a latency tail may be made of."""
    if before is None or after is None:
        return {}
    return {generation: {key: round(value - before.get(generation, {}).get(key, 0.0), 4)
                         for key, value in figures.items()}
            for generation, figures in after.items()}


def percentiles(histogram: Histogram) -> dict[str, float]:
    """p50, p99, p99.9, p99.99, mean and max in milliseconds (recorded in microseconds)."""
    def ms(us: float) -> float:
        return round(us / 1000.0, 3)

    return {"p50": ms(histogram.percentile(50)), "p99": ms(histogram.percentile(99)),
            "p99_9": ms(histogram.percentile(99.9)),
            "p99_99": ms(histogram.percentile(99.99)), "mean": ms(histogram.mean),
            "max": ms(histogram.max)}


async def nats_throughput(params: Params, tokens: Tokens, secret: Path, workdir: Path,
                          baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The throughput scenario on chatd with its embedded durable store, then on each
    deployment of :data:`NATS_SETUPS` (fresh nats-servers and chatd nodes each time).

    ``baseline`` is the embedded durable store's throughput figures if this run already
    measured them (target ``chatd_durable``); otherwise they are measured here first.
    Returns ``chatd_durable`` and one entry per deployment (``chatd_nats1``,
    ``chatd2_nats3``): the throughput scenario's figures, chatd's CPU summed over its nodes
    (``cpu_us_per_msg``, per node under ``nodes``) and the nats-servers' apart
    (``nats_cpu_us_per_msg``, per server under ``nats``), with ``chatd_nodes``,
    ``nats_servers``, ``replicas`` and ``cross_pairs``.
    """
    if baseline is None:
        async with Server("chatd_durable", secret, workdir) as server:
            print("== chatd_durable: throughput (beside NATS)", file=sys.stderr, flush=True)
            baseline = await throughput(server, params, tokens, workdir)
    out: dict[str, Any] = {"chatd_durable": baseline}
    for nodes, servers in NATS_SETUPS:
        async with NatsDeployment(nodes, servers, secret, workdir) as deployment:
            print(f"== {deployment.target}: throughput ({nodes} chatd node"
                  f"{'s' if nodes > 1 else ''} on {servers} nats-server"
                  f"{'s' if servers > 1 else ''})", file=sys.stderr, flush=True)
            result = await throughput(deployment, params, tokens, workdir)
            later = _problems(deployment, "after the measured window")
        if later:
            result["log_warnings_after"] = later
        places = [place(i, nodes) for i in range(params.pairs)]
        result.update(chatd_nodes=nodes, nats_servers=servers, replicas=deployment.replicas,
                      cross_pairs=sum(s != r for s, r in places))
        if not result["delivered"]:
            raise BenchError(f"{deployment.target}: no message was delivered in the "
                             f"throughput window; server errors: {result['errors'] or '-'}")
        out[deployment.target] = result
    return out
