"""A chatd cluster under test: N ``chatd serve`` processes linked to each other.

Node ``nI`` (``n1`` … ``nN``) gets its own client port, ``--node nI``, ``--cluster-listen
127.0.0.1:PORT`` on a port of its own, ``--peer`` for every other node, the harness's token
secret (``--secret-file``: the link handshake and the tokens both derive from it, so every
token works on every node), ``--store memory`` (or ``durable``) and ``--log-level info``,
since ``peer_up`` is logged at that level. :class:`Cluster` is ready when every node accepts
connections and has logged ``peer_up`` for each of its peers (and half a second later
still says so: a link may flap while the nodes start); it then behaves like one
:class:`~benchmarks.servers.Server` to the scenarios (``urls`` lists every node's,
:meth:`Cluster.sample` sums the nodes' processes and keeps each node's sample in
``parts``), and it counts the ``peer_down`` events logged since it was ready, so a
benchmark can say that a link broke during a measurement.

A one-node cluster (``nodes=1``) runs in cluster mode too: it has a cluster address and no
peers, so it pays for the same bookkeeping as the nodes of a larger cluster. With
``standalone=True`` the single node runs without a cluster address instead (named
``standalone``): one chatd as deployed without a cluster, which is the baseline to compare a
cluster with when a one-node cluster cannot store messages (replicated queues need two
nodes).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks.servers import START_DEADLINE, BenchError, Sample, Server, free_port

__all__ = ["Cluster", "ClusterNode", "node_name"]

STORES = ("memory", "durable")
#: Seconds every link must stay up, once all are, before the cluster counts as ready.
SETTLE = 0.5


def node_name(index: int) -> str:
    """The name of node ``index`` (from 0): ``n1``, ``n2``, …"""
    return f"n{index + 1}"


class ClusterNode(Server):
    """One ``chatd serve`` process of a cluster.

    Args:
        name: The node's name (``--node``).
        cluster_port: Where it listens for links from its peers (None: not in a cluster).
        peers: Every other node: name -> cluster port on 127.0.0.1.
        store: ``memory`` or ``durable``.
        label: How the benchmark names the cluster (``cluster2``); the node is then
            ``cluster2-n1`` in messages.
    """

    def __init__(self, name: str, cluster_port: int | None, peers: dict[str, int], store: str,
                 label: str, secret: Path, workdir: Path) -> None:
        super().__init__(f"{label}-{name}", secret, workdir)
        self.name = name
        self.cluster_port = cluster_port
        self.peers = peers
        self.store = store

    def argv(self) -> list[str]:
        """``python -m chatd serve`` as a node of the cluster."""
        argv = super().argv()  # the chatd command line of an unknown target: memory store
        argv[argv.index("--store") + 1] = self.store
        argv[argv.index("--log-level") + 1] = "info"  # peer_up and peer_down are info
        argv += ["--node", self.name]
        if self.cluster_port is not None:
            argv += ["--cluster-listen", f"127.0.0.1:{self.cluster_port}"]
        for peer, port in sorted(self.peers.items()):
            argv += ["--peer", f"{peer}=127.0.0.1:{port}"]
        return argv

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records named ``name`` that this node has written so far."""
        found = []
        try:
            text = self.stderr.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def peers_up(self) -> set[str]:
        """The peers this node's log says are linked now."""
        up: set[str] = set()
        for line in self.stderr.read_text(errors="replace").splitlines():
            if '"peer_up"' in line or '"peer_down"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "peer_up":
                    up.add(record["peer"])
                elif record.get("event") == "peer_down":
                    up.discard(record["peer"])
        return up


class Cluster:
    """``nodes`` linked chatd nodes, as an async context manager.

    Args:
        nodes: How many nodes (1 or more).
        secret: The token secret file, shared by every node.
        workdir: Where the nodes' data directories and logs go.
        store: ``memory`` (default) or ``durable``.
        standalone: One node outside any cluster (no cluster address); ``nodes`` must be 1.
    """

    def __init__(self, nodes: int, secret: Path, workdir: Path, store: str = "memory",
                 standalone: bool = False) -> None:
        if nodes < 1 or (standalone and nodes != 1):
            raise ValueError("a cluster has at least one node; a standalone node is one")
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}")
        self.target = "standalone" if standalone else f"cluster{nodes}"
        self._downs_before: dict[str, int] = {}
        self.store = store
        self.standalone = standalone
        ports = {node_name(i): None if standalone else free_port() for i in range(nodes)}
        self.nodes = [
            ClusterNode(name, port, {p: q for p, q in ports.items() if p != name and q},
                        store, self.target, secret, workdir)
            for name, port in ports.items()]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, ``n1`` first."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's client URL."""
        return self.nodes[0].url

    async def __aenter__(self) -> Cluster:
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._wait_linked()
        except BaseException:
            for node in self.nodes:
                node.kill()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _wait_linked(self) -> None:
        """Wait until every node's log says all its peers are up, and still says so
        :data:`SETTLE` seconds later; ``peer_down`` events logged until then (a link that
        flapped while the nodes started) are not counted by :meth:`peer_downs`."""
        deadline = time.monotonic() + START_DEADLINE
        linked_since: float | None = None
        while True:
            self.check()
            missing = {node.name: sorted(set(node.peers) - node.peers_up())
                       for node in self.nodes}
            missing = {name: peers for name, peers in missing.items() if peers}
            if missing:
                linked_since = None
            elif linked_since is None:
                linked_since = time.monotonic()
            elif time.monotonic() - linked_since >= SETTLE:
                self._downs_before = self._downs()
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.target}: nodes not linked after "
                                 f"{START_DEADLINE:.0f} s (missing peer_up: {missing})")
            await asyncio.sleep(0.05)

    def check(self) -> None:
        """Raise if any node has exited."""
        for node in self.nodes:
            node.check()

    def sample(self) -> Sample:
        """CPU and RSS summed over every node, each node's own sample in ``parts``."""
        return Sample.total([node.sample() for node in self.nodes])

    def _downs(self) -> dict[str, int]:
        return {node.name: len(node.events("peer_down")) for node in self.nodes}

    def peer_downs(self) -> dict[str, int]:
        """``peer_down`` events logged since the cluster was ready, per node that logged
        any."""
        counts = {name: count - self._downs_before.get(name, 0)
                  for name, count in self._downs().items()}
        return {name: count for name, count in counts.items() if count}

    def kill(self) -> None:
        """SIGKILL every node still running."""
        for node in self.nodes:
            node.kill()

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL), all at once."""
        await asyncio.gather(*(node.stop() for node in self.nodes))
