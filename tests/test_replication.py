"""Messages across a cluster of real ``chatd serve`` processes, and queues on two nodes.

Three nodes link into a cluster. Users on different nodes chat with every receipt; each
user's queue is kept by the two nodes its rendezvous ranking names, led by the first. A
node is killed with SIGKILL while messages keep coming: the senders still get ``sent``
for every message (the queue's other owner leads, the next node holds a hinted copy), the
recipient reconnects to another node and gets every message once, in order, and when the
killed node returns, the queues move back to it and both replicas hold the same entries,
which the test reads from their store directories after the nodes stop.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from daemons import DEADLINE, Daemon, serve

from chatd.actors import ActorTable
from chatd.auth import mint_token, read_secret
from chatd.client import Backoff, Client, connect
from chatd.cluster import ranking
from chatd.protocol import Msg, Receipt
from chatd.store import DurableStore, Entry

pytestmark = pytest.mark.slow

HEARTBEAT, FAILURE = 0.25, 1.5
NODES = ("n1", "n2", "n3")
FAST = Backoff(initial=0.05, maximum=0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def user_ranked(prefix: str, order: list[str]) -> str:
    """A user id whose rendezvous ranking over NODES is ``order``."""
    for n in range(10_000):
        user = f"{prefix}{n}"
        if ranking(user, NODES) == order:
            return user
    raise AssertionError(f"no user ranked {order}")


class Cluster:
    """Three nodes with fixed WebSocket and cluster ports, so that a node can come back.

    Each node runs in a task of ``nursery`` until :meth:`stop` (SIGTERM, exit status 0
    expected) or :meth:`kill` (SIGKILL); one left running is killed when the test ends.
    """

    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.cluster_ports = {name: free_port() for name in NODES}
        self.ports = {name: free_port() for name in NODES}
        self.secret = tmp_path / "secret"
        self.secret.write_text("cluster-secret\n")
        self.config = tmp_path / "cluster.toml"
        self.config.write_text(f"heartbeat_interval = {HEARTBEAT}\n"
                               f"failure_timeout = {FAILURE}\n")
        self.nodes: dict[str, Daemon] = {}
        self._stop: dict[str, trio.Event] = {}
        self._done: dict[str, trio.Event] = {}

    def url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.ports[name]}"

    def token(self, user: str) -> str:
        return mint_token(read_secret(self.secret), user, 3600.0)

    async def start(self, *names: str) -> None:
        """Start ``names`` at once (each waits for its peers before it serves)."""
        ready = {name: trio.Event() for name in names}
        for name in names:
            self._stop[name], self._done[name] = trio.Event(), trio.Event()
            self.nursery.start_soon(self._run, name, ready[name])
        with trio.fail_after(DEADLINE):
            for event in ready.values():
                await event.wait()

    async def _run(self, name: str, ready: trio.Event) -> None:
        peers = [f"--peer={peer}=127.0.0.1:{port}"
                 for peer, port in self.cluster_ports.items() if peer != name]
        try:
            async with serve(self.tmp_path / name, "--config", str(self.config),
                             "--node", name, "--secret-file", str(self.secret),
                             "--port", str(self.ports[name]),
                             "--cluster-listen", f"127.0.0.1:{self.cluster_ports[name]}",
                             *peers) as daemon:
                self.nodes[name] = daemon
                ready.set()
                await self._stop[name].wait()
        finally:
            self._done[name].set()

    async def stop(self, name: str) -> None:
        """SIGTERM ``name``, expect exit status 0, and wait until its task is done."""
        process = self.nodes[name].process
        process.terminate()
        with trio.fail_after(DEADLINE):
            assert await process.wait() == 0
        await self._end(name)

    async def kill(self, name: str) -> None:
        """SIGKILL ``name``."""
        await self.nodes[name].crash()
        await self._end(name)

    async def _end(self, name: str) -> None:
        self._stop[name].set()
        with trio.fail_after(DEADLINE):
            await self._done[name].wait()


async def logged(daemon: Daemon, event: str, count: int = 1,
                 where: Callable[[dict[str, Any]], bool] = lambda record: True
                 ) -> dict[str, Any]:
    """Wait (with a deadline) until ``daemon`` has logged ``event`` ``count`` times."""
    with trio.fail_after(DEADLINE):
        while True:
            found = [r for r in daemon.events(event) if where(r)]
            if len(found) >= count:
                return found[count - 1]
            await trio.sleep(0.02)


async def collect(client: Client, count: int, got: list[Msg], done: trio.Event,
                  read: bool = False) -> None:
    """Take ``count`` messages, acknowledging each (as read if asked), then set ``done``."""
    async for event in client.events():
        if isinstance(event, Msg):
            got.append(event)
            if read:
                await client.read(event.seq)
            else:
                await client.ack(event.seq)
            if len(got) == count:
                done.set()
                return


async def pending_on(data_dir: Path, user: str) -> list[Entry]:
    """The entries of ``user``'s queue in a stopped node's store directories."""
    store = DurableStore(ActorTable("reader"), [data_dir / "store" / "0",
                                                data_dir / "store" / "1"])
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        entries = list(await store.pending(user, 0, 100_000))
        nursery.cancel_scope.cancel()
    return entries


async def test_users_on_different_nodes_chat_with_every_receipt(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        got: list[Msg] = []
        all_read, seen = trio.Event(), trio.Event()
        receipts_seen: dict[str, set[str]] = {}
        ids = [f"m{i}" for i in range(20)]
        with trio.fail_after(DEADLINE):
            async with (connect(cluster.url("n1"), cluster.token("alice")) as alice,
                        connect(cluster.url("n2"), cluster.token("bob")) as bob,
                        trio.open_nursery() as chat):
                chat.start_soon(collect, bob, len(ids), got, all_read, True)

                async def watch() -> None:
                    async for event in alice.events():
                        if isinstance(event, Receipt):
                            receipts_seen.setdefault(event.status, set()).update(event.ids)
                            if all(receipts_seen.get(s) == set(ids)
                                   for s in ("delivered", "read")):
                                seen.set()
                                return

                chat.start_soon(watch)
                for msg_id in ids:
                    assert not (await alice.send("bob", f"hi {msg_id}", id=msg_id)).dup
                await all_read.wait()
                await seen.wait()
        assert [m.id for m in got] == ids
        assert [m.sender for m in got] == ["alice"] * len(ids)
        for name in NODES:
            await cluster.stop(name)
        assert not any(d.errors() for d in cluster.nodes.values())


async def test_a_node_killed_under_traffic_loses_nothing_and_replicas_converge(
        tmp_path: Path) -> None:
    bob = user_ranked("bob", ["n2", "n3", "n1"])  # n2 leads bob's queue, n3 follows
    everyone = list(NODES)
    ids = [f"m{i}" for i in range(60)]
    later = [f"later{i}" for i in range(5)]
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        got: list[Msg] = []
        all_received = trio.Event()
        with trio.fail_after(DEADLINE * 3):
            async with (connect(cluster.url("n1"), cluster.token("alice")) as alice,
                        connect([cluster.url("n2"), cluster.url("n3")], cluster.token(bob),
                                reconnect=True, backoff=FAST) as bob_client,
                        trio.open_nursery() as chat):
                assert bob_client.url == cluster.url("n2")
                chat.start_soon(collect, bob_client, len(ids), got, all_received, True)
                receipts: dict[str, set[str]] = {}
                first_receipts = trio.Event()

                async def watch() -> None:
                    async for event in alice.events():
                        if isinstance(event, Receipt):
                            receipts.setdefault(event.status, set()).update(event.ids)
                            if all(set(ids[:10]) <= receipts.get(s, set())
                                   for s in ("delivered", "read")):
                                first_receipts.set()

                chat.start_soon(watch)
                # Both on their nodes: chat with every receipt.
                for msg_id in ids[:10]:
                    await alice.send(bob, f"body {msg_id}", id=msg_id)
                await first_receipts.wait()
                # Kill bob's node (the leader of bob's queue) while alice keeps sending.
                for msg_id in ids[10:20]:
                    await alice.send(bob, f"body {msg_id}", id=msg_id)
                await cluster.kill("n2")
                for msg_id in ids[20:]:
                    sent = await alice.send(bob, f"body {msg_id}", id=msg_id)
                    assert not sent.dup
                await all_received.wait()
                assert bob_client.url == cluster.url("n3")
                chat.cancel_scope.cancel()
            assert [m.id for m in got] == ids  # every message once, in order
            assert [m.body for m in got] == [f"body {i}" for i in ids]

            # The killed node returns: the queues move back and the replicas converge.
            handoffs = {name: sum(r["up"] == everyone
                                  for r in cluster.nodes[name].events("handoff_done"))
                        for name in ("n1", "n3")}
            await cluster.start("n2")
            for name in ("n1", "n3"):
                await logged(cluster.nodes[name], "handoff_done", handoffs[name] + 1,
                             lambda r: r["up"] == everyone)
            await logged(cluster.nodes["n2"], "handoff_done", 1, lambda r: r["up"] == everyone)
            async with connect(cluster.url("n1"), cluster.token("alice")) as alice:
                for msg_id in later:
                    await alice.send(bob, f"body {msg_id}", id=msg_id)
        for name in NODES:
            await cluster.stop(name)
    held = {name: [(e.seq, e.item.id) for e in await pending_on(tmp_path / name, bob)]
            for name in NODES}
    assert [msg_id for _, msg_id in held["n2"]] == later
    assert held["n2"] == held["n3"]  # both replicas hold the same pending set
    assert held["n1"] == []  # the hinted copy went back to the owners
    assert not any(d.errors() for d in cluster.nodes.values())
