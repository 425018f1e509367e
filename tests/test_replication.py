"""Messages across a cluster of real ``chatd serve`` processes, and queues on two nodes.

Three nodes link into a cluster. Users on different nodes chat with every receipt; each
user's queue is kept by the two nodes its rendezvous ranking names, led by the first. A
node is killed with SIGKILL while messages keep coming: the senders still get ``sent``
for every message (the queue's other owner leads, the next node holds a hinted copy), the
recipient reconnects to another node and gets every message once, in order, and when the
killed node returns, the queues move back to it and both replicas hold the same entries,
which the test reads from their store directories after the nodes stop. A link cut
between two nodes is bridged by the third, and ``chatd listen`` fails over to another
node like the client library.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, first_line, run, serve
from test_cluster import LinkCutter, free_port, logged

from chatd.actors import ActorTable
from chatd.auth import mint_token, read_secret
from chatd.client import Backoff, Client, connect
from chatd.cluster import ranking
from chatd.protocol import Error, Msg, Presence, Receipt, Sent
from chatd.store import DurableStore, Entry

pytestmark = pytest.mark.slow

HEARTBEAT, FAILURE = 0.25, 1.5
NODES = ("n1", "n2", "n3")
FAST = Backoff(initial=0.05, maximum=0.5)


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
        #: (node, peer) -> the port ``node`` dials to reach ``peer`` (a relay), if not
        #: the peer's own.
        self.via: dict[tuple[str, str], int] = {}
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
        peers = [f"--peer={peer}=127.0.0.1:{self.via.get((name, peer), port)}"
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
    offline = [f"offline{i}" for i in range(5)]
    later = [f"later{i}" for i in range(5)]
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        got: list[Msg] = []
        all_received = trio.Event()
        with trio.fail_after(DEADLINE * 3):
            async with connect(cluster.url("n1"), cluster.token("alice")) as alice:
                async with (connect([cluster.url("n2"), cluster.url("n3")],
                                    cluster.token(bob), reconnect=True,
                                    backoff=FAST) as bob_client,
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
                # With bob away and n2 still down, messages wait on n3 and on n1 (the
                # next member of bob's ranking, holding a hinted copy).
                for msg_id in offline:
                    await alice.send(bob, f"body {msg_id}", id=msg_id)
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
        # n1 first: with n1 gone, n2 and n3 are still bob's replicas, so nothing moves.
        for name in NODES:
            await cluster.stop(name)
    held = {name: [(e.seq, e.item.id) for e in await pending_on(tmp_path / name, bob)]
            for name in NODES}
    assert [msg_id for _, msg_id in held["n2"]] == offline + later  # moved back to n2
    assert held["n2"] == held["n3"]  # both replicas hold the same pending set
    assert held["n1"] == []  # the hinted copy went back to the owners
    assert not any(d.errors() for d in cluster.nodes.values())


async def test_a_cut_link_is_bridged_by_the_third_node_and_the_queues_merge_after(
        tmp_path: Path) -> None:
    # bob's queue is owned by n1 and n2, the two nodes that lose each other: during the
    # cut each of them sees itself as its leader, and n3 (which sees both) arbitrates.
    bob = user_ranked("bob", ["n1", "n2", "n3"])
    alice = user_ranked("alice", ["n2", "n1", "n3"])
    everyone = list(NODES)
    during = [f"cut{i}" for i in range(10)]
    after = [f"healed{i}" for i in range(5)]
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        cutter = await nursery.start(LinkCutter(cluster.cluster_ports["n2"]).run)
        cluster.via[("n1", "n2")] = cutter.port  # n1 dials n2 through the relay
        await cluster.start(*NODES)
        n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
        with trio.fail_after(DEADLINE * 3):
            async with (connect(cluster.url("n1"), cluster.token(alice)) as on_n1,
                        connect(cluster.url("n2"), cluster.token(bob)) as on_n2,
                        trio.open_nursery() as chat):
                got: list[Msg] = []
                all_read = trio.Event()
                chat.start_soon(collect, on_n2, len(during), got, all_read, True)
                read: set[str] = set()
                receipts_in = trio.Event()

                async def watch() -> None:
                    async for event in on_n1.events():
                        if isinstance(event, Receipt) and event.status == "read":
                            read.update(event.ids)
                            if read >= set(during):
                                receipts_in.set()

                chat.start_soon(watch)
                downs = {d: len(d.events("peer_down")) for d in (n1, n2)}
                cutter.cut = True
                assert (await logged(n1, "peer_down", downs[n1] + 1))["peer"] == "n2"
                assert (await logged(n2, "peer_down", downs[n2] + 1))["peer"] == "n1"
                # During the cut: every message is accepted, and reaches bob at once
                # through n3; his read receipts come back the same way.
                for msg_id in during:
                    assert not (await on_n1.send(bob, msg_id, id=msg_id)).dup
                await all_read.wait()
                await receipts_in.wait()
                assert [m.id for m in got] == during
                # The link heals: the nodes link again and merge bob's two copies.
                handoffs = {name: sum(r["up"] == everyone
                                      for r in cluster.nodes[name].events("handoff_done"))
                            for name in NODES}
                ups = {d: len(d.events("peer_up")) for d in (n1, n2)}
                cutter.cut = False
                await logged(n1, "peer_up", ups[n1] + 1)
                await logged(n2, "peer_up", ups[n2] + 1)
                for name in ("n1", "n2"):
                    await logged(cluster.nodes[name], "handoff_done", handoffs[name] + 1,
                                 lambda r: r["up"] == everyone)
                chat.cancel_scope.cancel()
            # Messages for bob while he is away wait on both of his queue's owners.
            async with connect(cluster.url("n3"), cluster.token(alice)) as on_n3:
                for msg_id in after:
                    await on_n3.send(bob, msg_id, id=msg_id)
        # n3 first: with n3 gone, n1 and n2 are still bob's replicas, so nothing moves.
        for name in ("n3", "n1", "n2"):
            await cluster.stop(name)
        nursery.cancel_scope.cancel()  # the relay
    held = {name: [(e.seq, e.item.id) for e in await pending_on(tmp_path / name, bob)]
            for name in NODES}
    assert [msg_id for _, msg_id in held["n1"]] == after
    assert held["n1"] == held["n2"]
    assert held["n3"] == []
    assert not any(d.errors() for d in cluster.nodes.values())


async def test_cli_listen_fails_over_to_another_node(tmp_path: Path) -> None:
    bob = user_ranked("bob", ["n2", "n3", "n1"])
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        alice, bob_token = cluster.token("alice"), cluster.token(bob)
        status, _, err = await run(["send", "--url", cluster.url("n1"), "--token", alice,
                                    "--to", bob, "before"])
        assert status == 0, err
        listen = await trio.lowlevel.open_process(
            [*CHATD, "listen", "--url", cluster.url("n2"), "--url", cluster.url("n3"),
             "--token", bob_token, "--count", "3", "--timeout", str(DEADLINE)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert listen.stdout is not None
            assert b'"body":"before"' in await first_line(listen.stdout)
            await cluster.kill("n2")  # the node bob listens on, and his queue's leader
            for text in ("after1", "after2"):
                status, _, err = await run(["send", "--url", cluster.url("n1"), "--token",
                                            alice, "--to", bob, text])
                assert status == 0, err
            rest = b""
            with trio.fail_after(DEADLINE):
                async for chunk in listen.stdout:
                    rest += chunk
                assert await listen.wait() == 0
        finally:
            if listen.poll() is None:
                listen.kill()
            await listen.wait()
        lines = rest.decode().splitlines()
        assert [json.loads(line)["body"] for line in lines] == ["after1", "after2"]
        for name in ("n1", "n3"):
            await cluster.stop(name)


async def test_presence_crosses_nodes(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        with trio.fail_after(DEADLINE):
            async with connect(cluster.url("n1"), cluster.token("alice")) as alice:
                never = await alice.last_seen("bob")
                assert (never.online, never.last_seen) == (False, None)
                await alice.subscribe(["bob"])
                updates: list[Presence] = []
                online, offline = trio.Event(), trio.Event()

                async def watch() -> None:
                    async for event in alice.events():
                        if isinstance(event, Presence) and event.user == "bob":
                            updates.append(event)
                            (online if event.online else offline).set()

                async with trio.open_nursery() as watching:
                    watching.start_soon(watch)
                    await offline.wait()  # the answer to the subscription: never seen
                    offline = trio.Event()
                    async with connect(cluster.url("n2"), cluster.token("bob")):
                        await online.wait()  # pushed to alice on n1 from bob's node n2
                        seen = await alice.last_seen("bob")
                        assert seen.online and seen.last_seen is not None
                    await offline.wait()
                    gone = await alice.last_seen("bob")
                    assert not gone.online and gone.last_seen >= seen.last_seen
                    # A node that dies takes its users' presence with it.
                    online, offline = trio.Event(), trio.Event()
                    async with connect(cluster.url("n2"), cluster.token("bob")):
                        await online.wait()
                        await cluster.kill("n2")
                        await offline.wait()
                    watching.cancel_scope.cancel()
        for name in ("n1", "n3"):
            await cluster.stop(name)


async def test_a_cluster_of_one_node_keeps_its_queues_alone(tmp_path: Path) -> None:
    # The first node of a cluster that will grow: with no peers configured, its own store
    # (two replicas on disk) is the only copy there can be, and it serves.
    async with serve(tmp_path, "--cluster-listen", f"127.0.0.1:{free_port()}") as node:
        with trio.fail_after(DEADLINE):
            async with (connect(node.url, node.token("alice")) as alice,
                        connect(node.url, node.token("bob")) as bob):
                assert not (await alice.send("bob", "hello", id="m1")).dup
                async for event in bob.events():
                    if isinstance(event, Msg):
                        assert (event.id, event.body) == ("m1", "hello")
                        break


async def test_a_pipelined_run_of_sends_is_written_together_in_order(tmp_path: Path) -> None:
    # One write from alice carries sends to two users whose queues other nodes lead, a
    # repeated id, and an id reused for dave, whose queue bob's leader also leads (the
    # node that remembers the id): one request per leader, and every answer as if the
    # sends had come one by one.
    bob = user_ranked("bob", ["n2", "n3", "n1"])
    carol = user_ranked("carol", ["n3", "n1", "n2"])
    dave = user_ranked("dave", ["n2", "n1", "n3"])
    run = [(f"b{i}", bob, f"to bob {i}") if i % 3 else (f"c{i}", carol, f"to carol {i}")
           for i in range(30)]
    run += [("b1", bob, "again"), ("b2", dave, "reused")]
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp_path, nursery)
        await cluster.start(*NODES)
        got: dict[str, list[Msg]] = {bob: [], carol: []}
        with trio.fail_after(DEADLINE):
            async with (connect(cluster.url("n1"), cluster.token("alice")) as alice,
                        connect(cluster.url("n2"), cluster.token(bob)) as on_bob,
                        connect(cluster.url("n3"), cluster.token(carol)) as on_carol,
                        trio.open_nursery() as chat):
                answers: dict[str, list[Sent | Error]] = {}
                all_answered, all_received = trio.Event(), trio.Event()
                expected = {bob: [i for i, to, _ in run[:30] if to == bob],
                            carol: [i for i, to, _ in run[:30] if to == carol]}

                async def answered() -> None:
                    async for event in alice.events():
                        if isinstance(event, Sent | Error):
                            key = event.id if isinstance(event, Sent) else str(event.ref)
                            answers.setdefault(key, []).append(event)
                            if sum(map(len, answers.values())) == len(run):
                                all_answered.set()

                async def receive(client: Client, user: str) -> None:
                    async for event in client.events():
                        if isinstance(event, Msg):
                            got[user].append(event)
                            if all(len(got[u]) == len(expected[u]) for u in got):
                                all_received.set()

                chat.start_soon(answered)
                chat.start_soon(receive, on_bob, bob)
                chat.start_soon(receive, on_carol, carol)
                await alice.submit(run)
                await all_answered.wait()
                await all_received.wait()
                chat.cancel_scope.cancel()
        assert [m.id for m in got[bob]] == expected[bob]  # each queue in the order sent
        assert [m.id for m in got[carol]] == expected[carol]
        assert all(isinstance(answers[i][0], Sent) for i, _, _ in run[:30])
        first, again = answers["b1"]
        assert isinstance(again, Sent) and again.dup and again.ts == first.ts
        conflict = answers["b2"][1]
        assert isinstance(conflict, Error) and conflict.code == "id_conflict"
        for name in NODES:
            await cluster.stop(name)
