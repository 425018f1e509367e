"""The servers under test: start one on a free port, wait for it, measure it, stop it.

Targets:

- ``chatd``: ``python -m chatd serve --store memory`` (the same work as the peer);
- ``chatd_durable``: ``python -m chatd serve --store durable`` (the default: every message
  fsync'd on two replicas before ``sent``);
- ``peer``: ``python -m benchmarks.peers.websockets_peer``, a router on websockets and
  uvloop speaking the same protocol.

A chatd server may be given settings (``Server(..., settings={"rate_limit": ...})``): they
go into a TOML file in its directory, passed with ``--config`` (the peer has no settings).

Every server gets a fresh data directory, the harness's token secret file, its
``RLIMIT_NOFILE`` soft limit raised to the hard limit, and stdout and stderr in files (shown
when it fails). CPU time and resident memory are read from ``/proc`` for the server process
and any processes it started.

chatd on NATS (nats-server processes and chatd nodes on them) is started by
:mod:`benchmarks.natsdeploy`, which reuses :class:`Server`, :class:`Sample` and
:func:`measure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

from chatd.listener import unused_port

__all__ = ["TARGETS", "BenchError", "Sample", "Server", "children", "free_port", "kill_all",
           "measure", "measure_one", "prepare_child", "write_secret"]

TARGETS = ("chatd", "chatd_durable", "peer")
#: Seconds a server has to start listening, and to stop after SIGTERM before SIGKILL.
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0
_TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
#: Every child process started by the harness and not yet reaped: the last resort at exit.
LIVE: set[subprocess.Popen[bytes] | asyncio.subprocess.Process] = set()


def kill_all() -> None:
    """SIGKILL every child process still running (servers and load generators)."""
    for process in tuple(LIVE):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    LIVE.clear()


class BenchError(Exception):
    """A benchmark cannot go on: a server or a worker failed. Reported as one line."""


class Sample:
    """CPU seconds used so far and resident memory now, of a process and its children,
    with the whole machine's busy and softirq CPU seconds so far (``/proc/stat``)."""

    def __init__(self, cpu: float, rss_kb: int, parts: list[Sample] | None = None,
                 backend: Sample | None = None) -> None:
        self.cpu = cpu
        self.rss_kb = rss_kb
        #: The samples this one sums, one per process (the chatd nodes on NATS), or empty.
        self.parts = parts or []
        #: The processes the server stores in (the nats-servers), sampled at the same
        #: moment and not counted in ``cpu``; None for a server that stores by itself.
        self.backend = backend
        self.clock = time.monotonic()
        #: The server's young garbage collections so far, where it says (chatd), and the
        #: moment they were read (the scrape is not at ``clock``: see
        #: :meth:`Server.young_collections`).
        self.gc_young: int | None = None
        self.gc_clock: float | None = None
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        self.machine_busy = (sum(ticks) - ticks[3] - ticks[4]) / _TICK
        self.softirq = ticks[6] / _TICK

    @classmethod
    def total(cls, parts: list[Sample], backend: Sample | None = None) -> Sample:
        """The sum of several processes' samples (taken one after another, just now)."""
        return cls(sum(p.cpu for p in parts), sum(p.rss_kb for p in parts), parts, backend)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now, below the ephemeral range (so
    that a load generator's or a node's outgoing connection cannot take it first)."""
    return unused_port()


def write_secret(path: Path) -> None:
    """A fresh token secret: 64 hex characters and a newline, readable by the owner only."""
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)


def command(target: str, port: int, data_dir: Path, secret: Path,
            http_port: int = 0) -> list[str]:
    """The command line that runs ``target`` on ``port`` (chatd's HTTP port on
    ``http_port``, 0 for any)."""
    if target == "peer":
        return [sys.executable, "-m", "benchmarks.peers.websockets_peer", "--host",
                "127.0.0.1", "--port", str(port), "--secret-file", str(secret)]
    store = "durable" if target == "chatd_durable" else "memory"
    return [sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir), "--secret-file", str(secret), "--store", store,
            "--log-level", "warning", "--http-listen", f"127.0.0.1:{http_port}"]


def prepare_child() -> None:
    """In a child before exec: allow as many open files as the hard limit, and die with the
    harness (Linux ``PR_SET_PDEATHSIG``) even if the harness is killed outright."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, on one line."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:300] for line in text[-lines:])


def children() -> dict[int, list[int]]:
    """Every process's children, by parent pid, from ``/proc``."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _usage(pid: int) -> tuple[int, int] | None:
    """CPU ticks (user + system) and VmRSS in KiB of ``pid`` alone; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss_kb = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return int(fields[11]) + int(fields[12]), rss_kb  # utime, stime (stat fields 14, 15)


def measure(pid: int) -> Sample:
    """CPU seconds (user + system) and VmRSS of ``pid`` and all its descendants."""
    tree = children()
    pending, cpu_ticks, rss_kb = [pid], 0, 0
    while pending:
        current = pending.pop()
        pending.extend(tree.get(current, ()))
        usage = _usage(current)
        if usage is not None:
            cpu_ticks += usage[0]
            rss_kb += usage[1]
    return Sample(cpu_ticks / _TICK, rss_kb)


def measure_one(pid: int) -> Sample:
    """CPU seconds (user + system) and VmRSS of ``pid`` alone, not its children (zero once
    it is gone)."""
    cpu_ticks, rss_kb = _usage(pid) or (0, 0)
    return Sample(cpu_ticks / _TICK, rss_kb)


class Server:
    """One server process of a target, as an async context manager."""

    def __init__(self, target: str, secret: Path, workdir: Path,
                 port: int | None = None, settings: dict[str, int | float] | None = None) -> None:
        self.target = target
        self.secret = secret
        #: chatd settings written to a ``--config`` file (ignored by the peer).
        self.settings = dict(settings or {})
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        #: chatd's HTTP port (its /metrics), 0 for the peer.
        self.http_port = 0 if target == "peer" else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=workdir))
        self.stderr = self.dir / "stderr.log"
        self.stdout = self.dir / "stdout.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        """Every URL sessions may use: this server's only (chatd x2 on NATS has two)."""
        return [self.url]

    def argv(self) -> list[str]:
        """The command line of this server (with ``--config`` for its settings)."""
        argv = command(self.target, self.port, self.dir / "data", self.secret, self.http_port)
        if self.settings and self.target != "peer":
            config = self.dir / "settings.toml"
            config.write_text("".join(f"{key} = {value!r}\n"
                                      for key, value in self.settings.items()))
            argv += ["--config", str(config)]
        return argv

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def start(self) -> None:
        """Start the process and wait until it accepts connections (killed on failure)."""
        argv = self.argv()
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=prepare_child,
                cwd=Path(__file__).resolve().parent.parent)
        LIVE.add(self.process)
        try:
            await self._wait_listening()
        except BaseException:
            self.kill()
            raise

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def failure(self, what: str) -> BenchError:
        """A one-line error about this server, with the tail of its stderr."""
        code = self.process.poll() if self.process else None
        status = "" if code is None else f" (exit status {code})"
        return BenchError(f"{self.target} {what}{status}; stderr: {tail(self.stderr) or '-'}")

    async def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.failure("exited before listening")
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise self.failure(f"not listening after {START_DEADLINE:.0f} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def check(self) -> None:
        """Raise if the server has exited."""
        if self.process is None or self.process.poll() is not None:
            raise self.failure("exited during the benchmark")

    def sample(self) -> Sample:
        """CPU and RSS now, from ``/proc`` only (quick: no request to the server)."""
        self.check()
        assert self.process is not None
        return measure(self.process.pid)

    def young_collections(self) -> tuple[int, float] | None:
        """The server's young garbage collections so far, from chatd's /metrics, and the
        middle of the scrape on the monotonic clock (None for the peer, or if the scrape
        fails). A busy chatd can take a second to answer, so the harness scrapes outside
        its measured windows, never between a worker's mark and a server sample."""
        start = time.monotonic()
        text = self._metrics()
        if text is None:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "python_gc_collections_total"
                        and sample.labels.get("generation") == "0"):
                    return int(sample.value), (start + time.monotonic()) / 2
        return None

    def remembered_ids(self) -> int | None:
        """The message ids the server remembers now, from chatd's
        ``chatd_message_ids_remembered`` (None for the peer, or if the scrape fails)."""
        text = self._metrics()
        if text is None:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "chatd_message_ids_remembered":
                    return int(sample.value)
        return None

    def gc_pauses(self) -> dict[str, dict[str, float]] | None:
        """The server's garbage-collector pauses so far, per generation, from chatd's
        ``chatd_gc_pause_seconds``: ``count``, ``seconds`` (their sum), and how many lasted
        over 1 ms and over 5 ms (``over_1ms``, ``over_5ms``). None for the peer, or if the
        scrape fails."""
        text = self._metrics()
        if text is None:
            return None
        pauses: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "chatd_gc_pause_seconds":
                continue
            for sample in family.samples:
                figures = pauses.setdefault(sample.labels["generation"], {})
                if sample.name.endswith("_count"):
                    figures["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    figures["seconds"] = sample.value
                elif sample.labels.get("le") in ("0.001", "0.005"):
                    key = "over_1ms" if sample.labels["le"] == "0.001" else "over_5ms"
                    figures[key] = -sample.value  # the total is added below
        for figures in pauses.values():
            for key in ("over_1ms", "over_5ms"):
                figures[key] = figures.get("count", 0.0) + figures.get(key, 0.0)
        return pauses

    def _metrics(self) -> str | None:
        """chatd's /metrics text, or None (the peer, or the scrape failed)."""
        if not self.http_port:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics",
                                        timeout=5) as answer:
                return str(answer.read().decode())
        except OSError:
            return None

    def problems(self) -> dict[str, list[str]]:
        """Warnings and errors logged since the last call, per process: a single server's
        are not watched (always empty); chatd on NATS watches its nodes and nats-servers."""
        return {}

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            LIVE.discard(self.process)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after :data:`STOP_DEADLINE`; returns the exit status."""
        process = self.process
        if process is None:
            return None
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + STOP_DEADLINE
                while process.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
        finally:
            self.kill()
            shutil.rmtree(self.dir / "data", ignore_errors=True)
        return process.returncode
