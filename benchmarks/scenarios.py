"""The scenarios, each run against a fresh server process of one target (or a fresh cluster).

1. :func:`connections`: N authenticated idle sessions, held for a while: connect rate,
   server RSS per connection and idle CPU.
2. :func:`throughput`: P sender/recipient pairs as fast as the server allows, with
   delivered and read receipts: messages per second and server CPU per routed message.
3. :func:`latency`: the same pairs at a fixed offered load: send-to-deliver latency
   percentiles from an HDR-style histogram merged over the workers.
4. :func:`cluster_connections`: the connections scenario against a chatd cluster, the
   sessions spread round-robin over its nodes: figures per node and in total.
5. :func:`cluster_throughput`: the throughput scenario against a one-node cluster and
   against an N-node cluster (users spread over the nodes, see :func:`place`): the
   scaling from one node to N.

Server CPU and RSS are sampled from ``/proc`` just before and just after each measured
window (summed over a cluster's nodes, and per node); the load generator's own CPU over
the same window is reported beside it.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from benchmarks.cluster import Cluster
from benchmarks.hdr import Histogram
from benchmarks.loadgen import MAX_SESSIONS
from benchmarks.servers import BenchError, Sample, Server
from benchmarks.workers import Pool, Progress

__all__ = ["BASELINES", "PLACEMENTS", "WARNINGS", "Params", "Tokens", "cluster_connections",
           "cluster_throughput", "connections", "latency", "place", "throughput", "warn"]

#: What the scenarios run against: one server, or a cluster of nodes (one URL each).
Target = Server | Cluster
#: How the throughput scenario puts each pair's two users on a cluster's nodes (:func:`place`).
PLACEMENTS = ("mixed", "cross", "local")
#: What cluster_throughput compares the cluster with (see :func:`cluster_throughput`).
BASELINES = ("standalone", "cluster")

#: Everything :func:`warn` said during the run, repeated under the final table.
WARNINGS: list[str] = []


def warn(message: str) -> None:
    """Say something the reader must not miss: on stderr now, and again after the table."""
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
    warmup: float = 2.0
    latency_seconds: float = 30.0
    concurrency: int = 200
    workers: int = 2
    drain: float = 10.0  # longest wait for the last messages and receipts after the load
    cluster_connections: int = 20_000  # spread over the nodes of the cluster
    nodes: int = 2  # nodes of the cluster scenarios' cluster
    cluster_store: str = "memory"
    placement: str = "mixed"  # see place()
    baseline: str = "standalone"  # cluster_throughput's one node: "standalone" or "cluster"


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


def _machine(server: Target, s0: Sample, s1: Sample, loadgen_cpu: float) -> dict[str, float]:
    """The whole machine's CPU over a window, and what neither side of the benchmark used
    (other processes; the kernel's softirq work for loopback traffic is shown apart).

    A loud warning if other processes used more than a fifth of a core: the figures of
    that window are then unreliable.
    """
    window = s1.clock - s0.clock
    softirq = s1.softirq - s0.softirq
    other = (s1.machine_busy - s0.machine_busy) - (s1.cpu - s0.cpu) - loadgen_cpu - softirq
    figures = {"machine_cpu_pct": _pct(s1.machine_busy - s0.machine_busy, window),
               "softirq_cpu_pct": _pct(softirq, window), "other_cpu_pct": _pct(other, window)}
    if figures["other_cpu_pct"] > 20.0:
        warn(f"{server.target}: other processes used {figures['other_cpu_pct']:.0f} % of a "
             "core during a measurement: its figures are unreliable")
    return figures


def _links(server: Target, when: str, before: dict[str, int] | None = None) -> dict[str, int]:
    """``peer_down`` events a cluster's nodes logged so far (more than ``before``), per
    node, with a warning if there are any (a single server has no links: always empty).

    A link that went down during a measurement means the nodes spent part of it declaring
    each other dead, forgetting and re-syncing each other's sessions.
    """
    downs = {node: count - (before or {}).get(node, 0)
             for node, count in server.peer_downs().items()}
    downs = {node: count for node, count in downs.items() if count > 0}
    if downs:
        warn(f"{server.target}: a link between nodes went down {when} (peer_down per node: "
             f"{downs}; see the nodes' logs for the reason)")
    return downs


def _per_node(server: Target, before: Sample, opened: Sample, held0: Sample, held1: Sample,
              by_url: dict[str, int]) -> list[dict[str, Any]]:
    """A cluster's connections figures node by node (empty for a single server): sessions,
    RSS per session (after holding them), CPU while connecting and while holding."""
    if not before.parts:
        return []
    nodes = []
    for k, url in enumerate(server.urls):
        b, o, h0, h1 = before.parts[k], opened.parts[k], held0.parts[k], held1.parts[k]
        count = by_url.get(url, 0)
        nodes.append({"node": f"n{k + 1}", "url": url, "connections": count,
                      "rss_kb_before": b.rss_kb, "rss_kb_after": h1.rss_kb,
                      "rss_kb_per_conn": round((h1.rss_kb - b.rss_kb) / count, 2) if count
                      else None,
                      "connect_server_cpu_pct": _server_pct(b, o),
                      "idle_cpu_pct": _server_pct(h0, h1)})
    return nodes


async def connections(server: Target, params: Params, tokens: Tokens,
                      logdir: Path, count: int | None = None) -> dict[str, Any]:
    """Open ``count`` (default ``params.connections``) idle sessions, hold them, close them.

    Against a cluster, session ``i`` goes to node ``i % nodes`` (round-robin), and the
    figures are also given node by node under ``nodes``.
    """
    n = params.connections if count is None else count
    urls = server.urls
    size = max(params.workers, math.ceil(n / MAX_SESSIONS))
    shares = _split(n, size)
    async with Pool(size, logdir) as pool:
        warm = [f"idle-warm-{k}" for k in range(len(urls))]  # one session per node
        await pool[0].request("connect", url=server.url, users=[
            [user, tokens(user), url] for user, url in zip(warm, urls, strict=True)])

        def login(w: int, i: int) -> list[str]:
            user = f"idle-{w}-{i}"
            return [user, tokens(user)] + ([urls[i % len(urls)]] if len(urls) > 1 else [])

        per_worker = [{"users": [login(w, i) for i in share]} for w, share in enumerate(shares)]
        await asyncio.sleep(0.5)
        before = server.sample()
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
        still_open = sum(m["idle_open"] for m in marks1) - len(warm)  # minus the warm-up
        downs = _links(server, "while the sessions were opened and held")
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
        if downs:
            result["peer_downs"] = downs
        nodes = _per_node(server, before, opened, held0, held1, _merge(replies, "by_url"))
        if nodes:
            result["nodes"] = nodes
        closing = await pool.all("close", timeout=60.0 + n / 100)
        result["close_s"] = round(max(r["elapsed"] for r in closing), 2)
        later = _links(server, "while the sessions were closed (not measured)", downs)
        if later:
            result["peer_downs_closing"] = later
    return result


def place(i: int, nodes: int, placement: str) -> tuple[int, int]:
    """The nodes (from 0) of pair ``i``'s sender and recipient on a cluster of ``nodes``.

    - ``mixed``: the sender on node ``i % nodes``, the recipient on node ``(i // nodes) %
      nodes``: every combination equally often, as when a load balancer spreads users
      independently of who talks to whom. On two nodes half of the pairs have both users
      on one node and half cross nodes; every node has as many senders as recipients.
    - ``cross``: every pair crosses nodes (the recipient on the sender's next nodes).
    - ``local``: both users on the sender's node (users sharded by conversation).
    """
    sender = i % nodes
    if nodes == 1 or placement == "local":
        return sender, sender
    if placement == "cross":
        return sender, (sender + 1 + (i // nodes) % (nodes - 1)) % nodes
    if placement == "mixed":
        return sender, (i // nodes) % nodes
    raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")


async def _open_pairs(server: Target, pool: Pool, params: Params, tokens: Tokens) -> list[int]:
    """Open the pairs, pair ``i`` in worker ``i % size``; returns pairs per worker.

    Against a cluster, each user goes to the node :func:`place` chooses.
    """
    size, urls = len(pool), server.urls
    per_worker: list[dict[str, Any]] = [{"pairs": []} for _ in range(size)]
    for i in range(params.pairs):
        pair = [f"s{i}", tokens(f"s{i}"), f"r{i}", tokens(f"r{i}")]
        if len(urls) > 1:
            sender, recipient = place(i, len(urls), params.placement)
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
    downs = _links(server, "by the end of a measured window")
    return ({"peer_downs": downs} if downs else {}) | {
        "window_s": round(window, 2), "delivered": delivered,
        "msgs_per_s": round(delivered / window, 1) if window > 0 else 0.0,
        "sent": _stat(marks1, "sent") - _stat(marks0, "sent"),
        "receipts_delivered": (_stat(marks1, "receipts_delivered")
                               - _stat(marks0, "receipts_delivered")),
        "receipts_read": _stat(marks1, "receipts_read") - _stat(marks0, "receipts_read"),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu * 1e6 / delivered, 2) if delivered else None,
        "server_cpu_pct": _pct(cpu, window),
        "loadgen_cpu_pct": _pct(_loadgen_cpu(marks0, marks1), window),
        **_machine(server, s0, s1, _loadgen_cpu(marks0, marks1)),
        # Frames/s per connection on the busier side (chatd allows 500 by default).
        "frames_per_s_per_conn": round(max(sends, 2 * acks) / pairs / window, 1) if window else 0,
        "errors": errors, "closed": closed,
    } | ({"nodes": [{"node": f"n{k + 1}", "server_cpu_s": round(b.cpu - a.cpu, 3),
                     "server_cpu_pct": _pct(b.cpu - a.cpu, window), "rss_kb": b.rss_kb}
                    for k, (a, b) in enumerate(zip(s0.parts, s1.parts, strict=True))]}
         if s0.parts else {})


async def _drain(server: Target, pool: Pool, timeout: float) -> dict[str, Any]:
    """Stop sending and wait until every message is answered, delivered and receipted."""
    await pool.all("stop")
    replies = await pool.all("drain", timeout=timeout + 30.0, limit=timeout)
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
                   seconds: float, hist: str = "") -> Window:
    """Warm up, then measure ``seconds`` of the load already started on ``pool``.

    A non-empty ``hist`` also clears the workers' histograms at the start and collects
    them at the end (the end marks then carry them).
    """
    warm = Progress(f"{server.target}: {scenario} warm-up", params.warmup, "s")
    await warm.sleep(params.warmup, server.check)
    marks0 = await pool.all("mark", hist="reset" if hist else "")
    s0 = server.sample()
    bar = Progress(f"{server.target}: {label}", seconds, "s")
    await bar.sleep(seconds, server.check)
    s1 = server.sample()
    marks1 = await pool.all("mark", hist="take" if hist else "")
    return Window(marks0, marks1, s0, s1, bar)


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
        histogram = Histogram()
        for mark in marks1:
            histogram.merge(Histogram.from_json(mark["hist"]))
        result = _traffic(server, params.pairs, window.marks0, marks1, window.s0, window.s1)
        result.update(await _drain(server, pool, params.drain))
        result.update(offered_per_s=round(rate, 1), samples=histogram.total,
                      max_send_lag_ms=round(max(m["max_lag_ms"] for m in marks1), 3),
                      latency_ms=percentiles(histogram), histogram=histogram.to_json())
        bar.finish(f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} "
                   f"ms, {histogram.total:,} samples")
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


def percentiles(histogram: Histogram) -> dict[str, float]:
    """p50, p99, p99.9, p99.99, mean and max in milliseconds (recorded in microseconds)."""
    def ms(us: float) -> float:
        return round(us / 1000.0, 3)

    return {"p50": ms(histogram.percentile(50)), "p99": ms(histogram.percentile(99)),
            "p99_9": ms(histogram.percentile(99.9)),
            "p99_99": ms(histogram.percentile(99.99)), "mean": ms(histogram.mean),
            "max": ms(histogram.max)}



async def cluster_connections(params: Params, tokens: Tokens, secret: Path,
                              workdir: Path) -> dict[str, Any]:
    """``params.cluster_connections`` idle sessions spread round-robin over the nodes of a
    fresh ``params.nodes``-node cluster: in total and per node (under ``nodes``)."""
    async with Cluster(params.nodes, secret, workdir, params.cluster_store) as cluster:
        print(f"== {cluster.target}: connections", file=sys.stderr, flush=True)
        result = await connections(cluster, params, tokens, workdir,
                                   params.cluster_connections)
    result.update(cluster_nodes=params.nodes, store=params.cluster_store)
    return result


async def cluster_throughput(params: Params, tokens: Tokens, secret: Path,
                             workdir: Path) -> dict[str, Any]:
    """The throughput scenario on one fresh node, then on a fresh ``params.nodes``-node
    cluster with the pairs placed by ``params.placement``.

    The one node is, by ``params.baseline``, a ``standalone`` chatd (no cluster address:
    one chatd as deployed without a cluster) or a one-node ``cluster`` (a cluster address
    and no peers). Returns ``nodes1`` and ``nodesN`` (each the throughput scenario's
    figures, with CPU summed over the nodes and given per node under ``nodes``) and
    ``scaling``: the N-node msgs_per_s over the one-node msgs_per_s.
    """
    out: dict[str, Any] = {}
    for size in (1, params.nodes):
        standalone = size == 1 and params.baseline == "standalone"
        async with Cluster(size, secret, workdir, params.cluster_store,
                           standalone=standalone) as cluster:
            print(f"== {cluster.target}: throughput", file=sys.stderr, flush=True)
            result = await throughput(cluster, params, tokens, workdir)
        places = [place(i, size, params.placement) for i in range(params.pairs)]
        result.update(cluster_nodes=size, store=params.cluster_store,
                      mode="standalone" if standalone else "cluster",
                      placement=params.placement if size > 1 else "local",
                      cross_pairs=sum(s != r for s, r in places))
        if not result["delivered"]:
            hint = (" (with replicated queues a one-node cluster cannot store messages: "
                    "use --baseline standalone)" if size == 1 and not standalone else "")
            raise BenchError(f"{cluster.target}: no message was delivered in the throughput "
                             f"window{hint}; server errors: {result['errors'] or '-'}")
        out[f"nodes{size}"] = result
    one, many = out["nodes1"]["msgs_per_s"], out[f"nodes{params.nodes}"]["msgs_per_s"]
    out["scaling"] = round(many / one, 2) if one else None
    return out
