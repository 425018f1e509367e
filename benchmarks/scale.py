"""The scale scenario: idle authenticated sessions by the hundred thousand on
``chatd serve --workers N`` (issue 14, goal 6).

:class:`WorkersServer` starts ``python -m chatd serve --workers N`` on a free port: the
supervisor, which starts its own local nats-server (under a watchdog process) and N worker
processes listening on that port with SO_REUSEPORT (:mod:`chatd.workers`). It is ready once
N sockets listen on the port (``/proc/net/tcp``) and its processes are found in ``/proc``
by their command lines: the supervisor, the workers (``--supervised``, named ``NODE-wI``),
the watchdog (``chatd.backends.nats.server watch``) and, under it, the nats-server. Worker
I's HTTP port (``/metrics``) is the I-th of a block of free ports.

:func:`scale` opens the sessions from as many load-generator processes as
:data:`~benchmarks.loadgen.MAX_SESSIONS` per process needs (each from its own loopback
source addresses, so no address's ephemeral ports run out), holds them idle, and reports
memory, CPU and open files per process. One process may have at most 20,000 open files
on the machines this runs on (:data:`FD_CAP`): the workers share the sessions, and the
scenario records each process's peak.

The module is a little over 500 lines: the deployment's processes and the scenario's
measurements of each of them are one bookkeeping, kept together.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import MAX_SESSIONS
from benchmarks.scenarios import (
    Params,
    Tokens,
    _backend_cpu,
    _machine,
    _merge,
    _pct,
    _split,
    warn,
)
from benchmarks.servers import (
    START_DEADLINE,
    BenchError,
    Sample,
    Server,
    children,
    measure_one,
)
from benchmarks.workers import Pool, Progress

__all__ = ["FD_CAP", "WorkersServer", "port_block", "scale", "scale_table"]

#: Open files one process may have on the machines this runs on (``ulimit -n``).
FD_CAP = 20_000
#: Warm-up sessions per chatd worker, opened before the baseline and held to the end.
WARM_PER_WORKER = 8
#: Seconds allowed per thousand sessions to open (on top of a fixed allowance).
OPEN_SECONDS_PER_1000 = 30.0
#: Passes over the sessions that could not be opened, after the first, as clients
#: reconnect: on two cores the storm of handshakes starves the workers and some logins
#: time out (with one pass more, 217 of 100,000 sessions failed twice; each later pass
#: has fewer handshakes in flight, and meets less of the storm).
RETRIES = 3
#: Seconds between two counts of every process's open files while connecting.
FD_INTERVAL = 1.0
#: Seconds the supervisor has to stop its workers and nats-server after SIGTERM
#: (``shutdown_timeout`` + the supervisor's margin, with room to spare).
WORKERS_STOP_DEADLINE = 40.0
#: The roles of the processes of ``chatd serve --workers``; all but the nats-server count
#: as chatd's.
ROLES = ("supervisor", "worker", "watchdog", "nats-server")


def port_block(count: int, exclude: frozenset[int] = frozenset()) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that nothing is bound to now,
    all below the ephemeral range (which outgoing connections take their ports from)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = max(1024, low - 16384)
    for base in random.sample(range(first, low - count), 500):
        ports = range(base, base + count)
        if exclude.intersection(ports):
            continue
        probes: list[socket.socket] = []
        try:
            for port in ports:
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise BenchError(f"no {count} consecutive free ports between {first} and {low}")


def listening(port: int) -> int:
    """How many IPv4 sockets listen on ``port`` (``/proc/net/tcp``, state 0A)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def open_files(pid: int) -> int:
    """How many file descriptors ``pid`` has open now (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_limit(pid: int) -> int | None:
    """The soft open-files limit of ``pid`` (``/proc/PID/limits``), None if unknown."""
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return int(value) if value.isdigit() else None
    return None


def _cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@attrs.define
class Process:
    """One process of ``chatd serve --workers``, and what the scenario saw of it.

    Attributes:
        name: The worker's node name (``node1-w3``), or its role for the others.
        role: One of :data:`ROLES`.
        pid: Its process id.
        http_port: A worker's HTTP port (0 for the others).
        fds_peak: The most file descriptors it was seen to hold.
    """

    name: str
    role: str
    pid: int
    http_port: int = 0
    fds_peak: int = 0

    def alive(self) -> bool:
        """Whether the process still runs (not exited, and not a zombie)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def count_files(self) -> int:
        """Its open files now; remembers the peak."""
        count = open_files(self.pid)
        self.fds_peak = max(self.fds_peak, count)
        return count


class WorkersServer(Server):
    """``python -m chatd serve --workers N`` on NATS (its own local nats-server), as an
    async context manager; :meth:`sample` sums chatd's processes (each in ``parts``, in
    the order of :attr:`processes`) and puts the nats-server under ``backend``."""

    def __init__(self, workers: int, secret: Path, workdir: Path) -> None:
        super().__init__("chatd_workers", secret, workdir)
        self.workers = workers
        self.http_port = port_block(workers, exclude=frozenset({self.port}))
        #: The supervisor and everything it runs, found once every worker listens.
        self.processes: list[Process] = []

    def argv(self) -> list[str]:
        """``chatd serve --workers N``: on a local nats-server it starts itself; worker I's
        HTTP port is the I-th from :attr:`http_port`; warnings and errors only."""
        return [sys.executable, "-m", "chatd", "serve", "--workers", str(self.workers),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.dir / "data"), "--secret-file", str(self.secret),
                "--log-level", "warning", "--http-listen", f"127.0.0.1:{self.http_port}"]

    @property
    def chatd(self) -> list[Process]:
        """chatd's processes: the supervisor, the workers and the nats-server's watchdog."""
        return [p for p in self.processes if p.role != "nats-server"]

    @property
    def nats(self) -> list[Process]:
        """The local nats-server (one process)."""
        return [p for p in self.processes if p.role == "nats-server"]

    async def _wait_listening(self) -> None:
        limit = START_DEADLINE + 5.0 * self.workers
        deadline = time.monotonic() + limit
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.failure("exited before listening")
            if listening(self.port) >= self.workers:
                self.processes = self._discover()
                if (sum(p.role == "worker" for p in self.processes) == self.workers
                        and len(self.nats) == 1):
                    return
            if time.monotonic() > deadline:
                raise self.failure(f"{listening(self.port)} of {self.workers} workers "
                                   f"listening after {limit:.0f} s")
            await asyncio.sleep(0.1)

    def _discover(self) -> list[Process]:
        """The supervisor, its workers (by worker number), the watchdog and the nats-server."""
        assert self.process is not None
        tree = children()
        supervisor = self.process.pid
        found = [Process("supervisor", "supervisor", supervisor)]
        workers: list[Process] = []
        for pid in tree.get(supervisor, ()):
            argv = _cmdline(pid)
            if "--supervised" in argv:
                name = next((a.split("=", 1)[1] for a in argv if a.startswith("--node=")), "?")
                index = int(name.rsplit("-w", 1)[1]) if "-w" in name else 0
                workers.append(Process(name, "worker", pid, self.http_port + index - 1))
            elif "chatd.backends.nats.server" in argv:
                found.append(Process("nats-watchdog", "watchdog", pid))
                found.extend(Process("nats-server", "nats-server", child)
                             for child in tree.get(pid, ()))
        workers.sort(key=lambda p: p.http_port)
        return found[:1] + workers + found[1:]

    def check(self) -> None:
        """Raise if the supervisor or any process it ran has exited (a restarted worker
        lost its sessions)."""
        super().check()
        for process in self.processes:
            if not process.alive():
                raise self.failure(f"process {process.name} (pid {process.pid}) exited "
                                   "during the benchmark")

    def sample(self) -> Sample:
        """CPU and RSS of chatd's processes (each in ``parts``) and of the nats-server
        (``backend``), from ``/proc``."""
        self.check()
        return Sample.total([measure_one(p.pid) for p in self.chatd],
                            backend=Sample.total([measure_one(p.pid) for p in self.nats]))

    def count_files(self) -> dict[str, int]:
        """Every process's open files now, by name (peaks remembered)."""
        return {p.name: p.count_files() for p in self.processes}

    async def metrics(self, timeout: float) -> dict[str, dict[str, float]]:
        """Each worker's ``chatd_sessions`` and ``chatd_connections`` (open,
        authenticating) from its /metrics, all scraped at once, by name; a worker that
        does not answer within ``timeout`` seconds (a busy one can take seconds) is left
        out."""
        workers = [p for p in self.processes if p.role == "worker"]
        answers = await asyncio.gather(*(asyncio.to_thread(_scrape, p.http_port, timeout)
                                         for p in workers))
        return {p.name: figures for p, figures in zip(workers, answers, strict=True)
                if figures is not None}

    async def stop(self) -> int | None:
        """SIGTERM to the supervisor, which stops its workers, then its nats-server; after
        :data:`WORKERS_STOP_DEADLINE`, :meth:`Server.stop` (SIGTERM again, which stops the
        workers at once, then SIGKILL); then SIGKILL to any of its processes still left."""
        process = self.process
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + WORKERS_STOP_DEADLINE
                while process.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            return await super().stop()
        finally:
            for left in self.processes:
                if left.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(left.pid, signal.SIGKILL)


def _scrape(port: int, timeout: float) -> dict[str, float] | None:
    """``chatd_sessions`` and ``chatd_connections`` by state from the /metrics at
    ``port`` (None if it does not answer within ``timeout`` seconds)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=timeout) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatd_sessions":
                figures["sessions"] = sample.value
            elif sample.name == "chatd_connections":
                figures[f"connections_{sample.labels.get('state')}"] = sample.value
    return figures


async def _wait_sessions(server: WorkersServer, count: int, limit: float) -> dict[str, Any]:
    """Wait until every worker answers its /metrics and they count ``count`` sessions in
    all (at most ``limit`` seconds); their figures by worker (without the workers that
    never answered)."""
    deadline = time.monotonic() + limit
    while True:
        figures = await server.metrics(max(deadline - time.monotonic(), 1.0))
        total = sum(f.get("sessions", 0) for f in figures.values())
        if (len(figures) == server.workers and total >= count) or time.monotonic() > deadline:
            return figures
        await asyncio.sleep(0.1)


async def _watch_files(server: WorkersServer) -> None:
    """Count every process's open files each :data:`FD_INTERVAL` until cancelled."""
    while True:
        await asyncio.to_thread(server.count_files)
        await asyncio.sleep(FD_INTERVAL)


def _per_conn(kb: float, connections: int) -> float | None:
    """KiB per session, to two decimals (None without sessions)."""
    return round(kb / connections, 2) if connections else None


async def scale(params: Params, tokens: Tokens, secret: Path, workdir: Path) -> dict[str, Any]:
    """``params.scale_connections`` idle sessions on ``chatd serve --workers
    params.scale_workers``, held ``params.scale_hold`` seconds.

    Before connecting, :data:`WARM_PER_WORKER` sessions per worker are opened (so every
    worker has served one) and the baseline is sampled. Reported: sessions opened and
    failures, the connect rate, chatd's RSS per connection (supervisor, workers and the
    nats-server's watchdog together) and the nats-server's apart, idle CPU of each while
    holding (% of one core), every process's peak open files against :data:`FD_CAP`, the
    sessions each worker holds (its /metrics), and the load generator's CPU and RSS.
    """
    n, workers = params.scale_connections, params.scale_workers
    warm = WARM_PER_WORKER * workers
    share = math.ceil(n / workers)
    if share > 0.8 * FD_CAP:
        raise BenchError(f"scale: {n:,} sessions over {workers} workers is about {share:,} "
                         f"open files each, too close to the {FD_CAP:,} a process may have: "
                         "use more --scale-workers")
    size = max(1, math.ceil((n + warm) / MAX_SESSIONS))
    shares = _split(n, size)
    print(f"== chatd_workers: {n:,} idle sessions on chatd serve --workers {workers}, from "
          f"{size} load-generator processes", file=sys.stderr, flush=True)
    server = WorkersServer(workers, secret, workdir)
    async with server, Pool(size, workdir) as pool:
        await pool[0].request("connect", url=server.url, timeout=60.0, users=[
            [f"scale-warm-{k}", tokens(f"scale-warm-{k}")] for k in range(warm)])
        warmed = await _wait_sessions(server, warm, 30.0)
        files0 = await asyncio.to_thread(server.count_files)
        before = server.sample()
        users = [{"users": [[f"scale-{w}-{i}", tokens(f"scale-{w}-{i}")] for i in part]}
                 for w, part in enumerate(shares)]
        bar = Progress("chatd_workers: connecting", n, " sessions")
        watcher = asyncio.create_task(_watch_files(server))
        try:
            replies = await pool.all("connect", users, url=server.url,
                                     concurrency=max(1, params.scale_concurrency // size),
                                     retries=RETRIES,
                                     timeout=30.0 + OPEN_SECONDS_PER_1000 * n / 1000,
                                     on_progress=lambda: bar.update(pool.done))
        finally:
            watcher.cancel()
        opened = server.sample()
        await asyncio.to_thread(server.count_files)
        elapsed = opened.clock - before.clock
        connected = sum(r["connected"] for r in replies)
        failed = _merge(replies, "failed")
        bar.finish(f"{connected:,} open, {connected / elapsed:,.0f}/s"
                   + (f", FAILED: {failed}" if failed else ""))
        if not connected:
            raise BenchError(f"chatd_workers: no session could be opened: {failed}")
        open_cpu = sum(r["cpu"] for r in replies)
        marks0 = await pool.all("mark")
        held0 = server.sample()
        hold = Progress(f"chatd_workers: holding {connected:,} idle", params.scale_hold, "s")
        await hold.sleep(params.scale_hold, server.check)
        held1 = server.sample()
        marks1 = await pool.all("mark")
        hold.finish()
        files1 = await asyncio.to_thread(server.count_files)
        held = await _wait_sessions(server, sum(m["idle_open"] for m in marks1), 120.0)
        loadgen = [measure_one(w.process.pid) for w in pool.workers if w.process is not None]
        window = held1.clock - held0.clock
        idle_loadgen = sum(float(b["cpu"]) - float(a["cpu"])
                           for a, b in zip(marks0, marks1, strict=True))
        assert before.backend is not None and held1.backend is not None
        result: dict[str, Any] = {
            "connections": connected, "requested": n, "failed": failed,
            "failed_first_attempt": _merge(replies, "failed_first"), "retries": RETRIES,
            "open_at_end": sum(m["idle_open"] for m in marks1) - warm,
            "closed": _merge(marks1, "closed"), "workers": workers,
            "warmup_sessions": warm, "loadgen_processes": size,
            "concurrency": max(1, params.scale_concurrency // size) * size,
            "connect_s": round(elapsed, 2), "connect_per_s": round(connected / elapsed, 1),
            "connect_chatd_cpu_pct": _pct(opened.cpu - before.cpu, elapsed),
            "connect_nats_cpu_pct": _pct(_backend_cpu(before, opened), elapsed),
            "connect_loadgen_cpu_pct": _pct(open_cpu, elapsed),
            **{f"connect_{k}": v for k, v in _machine(server, before, opened,
                                                      open_cpu).items()},
            "rss_kb_before": before.rss_kb, "rss_kb_after": held1.rss_kb,
            "rss_kb_per_conn": _per_conn(held1.rss_kb - before.rss_kb, connected),
            "nats_rss_kb_before": before.backend.rss_kb,
            "nats_rss_kb_after": held1.backend.rss_kb,
            "nats_rss_kb_per_conn": _per_conn(held1.backend.rss_kb - before.backend.rss_kb,
                                              connected),
            "hold_s": round(window, 2),
            "idle_cpu_pct": _pct(held1.cpu - held0.cpu, window),
            "nats_idle_cpu_pct": _pct(_backend_cpu(held0, held1), window),
            "idle_loadgen_cpu_pct": _pct(idle_loadgen, window),
            **_machine(server, held0, held1, idle_loadgen),
            "loadgen_rss_kb": sum(s.rss_kb for s in loadgen),
            "loadgen_rss_kb_per_conn": _per_conn(sum(s.rss_kb for s in loadgen),
                                                 connected + warm),
            "fd_cap": FD_CAP,
            "fds_peak_max": max(p.fds_peak for p in server.chatd),
            "sessions_by_worker": {p.name: (int(held[p.name].get("sessions", 0))
                                            if p.name in held else None)
                                   for p in server.processes if p.role == "worker"},
            "processes": _processes(server, (before, opened, held0, held1),
                                    (files0, files1), warmed, held),
        }
        result["total_rss_kb_per_conn"] = _per_conn(
            held1.rss_kb - before.rss_kb + held1.backend.rss_kb - before.backend.rss_kb,
            connected)
        result["under_fd_cap"] = all(p.fds_peak < FD_CAP for p in server.processes)
        _warn_scale(result, warm)
        closing = await pool.all("close", timeout=60.0 + n / 100)
        result["close_s"] = round(max(r["elapsed"] for r in closing), 2)
    return result


def _processes(server: WorkersServer, samples: tuple[Sample, Sample, Sample, Sample],
               files: tuple[dict[str, int], dict[str, int]],
               warmed: dict[str, dict[str, float]],
               held: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each process's figures: RSS before connecting and after holding, CPU while
    connecting and while holding (% of one core), open files (before, peak, at the end,
    and its limit), and a worker's sessions (after the warm-up and after holding)."""
    before, opened, held0, held1 = samples
    out = []
    parts = list(zip(server.chatd, before.parts, opened.parts, held0.parts, held1.parts,
                     strict=True))
    assert before.backend and opened.backend and held0.backend and held1.backend
    parts += list(zip(server.nats, before.backend.parts, opened.backend.parts,
                      held0.backend.parts, held1.backend.parts, strict=True))
    for process, b, o, h0, h1 in parts:
        figures: dict[str, Any] = {
            "name": process.name, "role": process.role, "pid": process.pid,
            "rss_kb_before": b.rss_kb, "rss_kb_after": h1.rss_kb,
            "connect_cpu_pct": _pct(o.cpu - b.cpu, opened.clock - before.clock),
            "idle_cpu_pct": _pct(h1.cpu - h0.cpu, held1.clock - held0.clock),
            "fds_before": files[0].get(process.name, 0), "fds_peak": process.fds_peak,
            "fds_end": files[1].get(process.name, 0), "fd_limit": fd_limit(process.pid)}
        if process.role == "worker":
            figures["warmup_sessions"] = (int(warmed[process.name].get("sessions", 0))
                                          if process.name in warmed else None)
            figures["sessions"] = (int(held[process.name].get("sessions", 0))
                                   if process.name in held else None)
        out.append(figures)
    return out


def _warn_scale(result: dict[str, Any], warm: int) -> None:
    """Say what the reader must not miss: failures, sessions lost or uncounted, a worker
    whose /metrics did not answer, and a process at or near its open-files cap."""
    if result["failed"]:
        warn(f"chatd_workers: {sum(result['failed'].values()):,} of {result['requested']:,} "
             f"sessions could not be opened: {result['failed']}")
    if result["open_at_end"] < result["connections"] or result["closed"]:
        warn(f"chatd_workers: {result['connections'] - result['open_at_end']:,} sessions were "
             f"lost while held: {result['closed'] or '-'}")
    counts = result["sessions_by_worker"]
    silent = [name for name, count in counts.items() if count is None]
    if silent:
        warn(f"chatd_workers: {', '.join(silent)} did not answer /metrics: its sessions are "
             "not counted")
    elif sum(counts.values()) != result["open_at_end"] + warm:
        warn(f"chatd_workers: the workers count {sum(counts.values()):,} sessions, the load "
             f"generator holds {result['open_at_end'] + warm:,}")
    for process in result["processes"]:
        limit = min(FD_CAP, process["fd_limit"] or FD_CAP)
        if process["fds_peak"] >= 0.95 * limit:
            warn(f"chatd_workers: {process['name']} held {process['fds_peak']:,} open files, "
                 f"at its limit of {limit:,}: use more --scale-workers")


def scale_table(figures: dict[str, Any]) -> list[str]:
    """The scale scenario's lines of the table, then the figures of this run's
    single-process connections scenario to compare with (``single_process``, by target)."""
    lines = ["", f"idle sessions on chatd serve --workers {figures['workers']} (scale)"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:34}{text}")

    failed = sum(figures["failed"].values())
    first = sum((figures.get("failed_first_attempt") or {}).values())
    row("sessions open", f"{figures['connections']:,} of {figures['requested']:,}"
        + (f" ({failed:,} failed)" if failed else "") + f", from "
        f"{figures['loadgen_processes']} load-generator processes")
    if first:
        row("failed at the first attempt", f"{first:,}, tried again "
            f"{figures.get('retries', 0)} time(s): {figures['failed_first_attempt']}")
    row("connect/s", f"{figures['connect_per_s']:,.0f} ({figures['connect_s']:.0f} s; "
        f"chatd CPU {figures['connect_chatd_cpu_pct']:.0f} %, nats-server "
        f"{figures['connect_nats_cpu_pct']:.0f} %, load gen "
        f"{figures['connect_loadgen_cpu_pct']:.0f} %)")
    row("RSS KiB/conn, chatd", f"{figures['rss_kb_per_conn']:.2f} (supervisor, workers and "
        f"watchdog: {figures['rss_kb_before'] / 1024:,.0f} -> "
        f"{figures['rss_kb_after'] / 1024:,.0f} MiB)")
    row("RSS KiB/conn, nats-server", f"{figures['nats_rss_kb_per_conn']:.2f} "
        f"({figures['nats_rss_kb_before'] / 1024:,.0f} -> "
        f"{figures['nats_rss_kb_after'] / 1024:,.0f} MiB)")
    row("idle CPU %, chatd / nats-server", f"{figures['idle_cpu_pct']:.1f} / "
        f"{figures['nats_idle_cpu_pct']:.1f} (over {figures['hold_s']:.0f} s; load gen "
        f"{figures['idle_loadgen_cpu_pct']:.1f}, machine {figures['machine_cpu_pct']:.0f})")
    row("load gen RSS KiB/conn", f"{figures['loadgen_rss_kb_per_conn']:.2f}")
    row("peak open files", f"{figures['fds_peak_max']:,} in one chatd process (cap "
        f"{figures['fd_cap']:,}: {'under' if figures['under_fd_cap'] else 'REACHED'})")
    for process in figures["processes"]:
        sessions = (" " * 17 if "sessions" not in process else
                    "      ? sessions, " if process["sessions"] is None else
                    f"{process['sessions']:>7,} sessions, ")
        lines.append(f"    {process['name']:32}{sessions}{process['fds_peak']:>7,} fds peak, "
                     f"RSS {process['rss_kb_after'] / 1024:>6,.0f} MiB, idle CPU "
                     f"{process['idle_cpu_pct']:.1f} %")
    compared = [(t, f) for t, f in (figures.get("single_process") or {}).items()
                if f.get("connections")]
    if compared:
        lines.append("  the peer is one process and cannot hold these; the connections scenario "
                     "of this run, one process each:")
        for target, conn in compared:
            lines.append(f"    {target:32}{conn['connections']:>7,} sessions, "
                         f"{conn['rss_kb_per_conn']:.2f} KiB/conn, idle CPU "
                         f"{conn['idle_cpu_pct']:.1f} %, {conn['connect_per_s']:,.0f} connect/s")
    return lines
