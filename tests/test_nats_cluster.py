"""Acceptance tests of the NATS backend with real processes: three nats-servers as one
JetStream cluster, and ``chatd serve --nats ...`` nodes on it.

Every chatd node of a deployment shares one token secret (``--secret-file``) and has its
own data directory and node name; the NATS settings other than the URLs come from a TOML
file with small timeouts. Crashes are SIGKILLs. Each test checks from the clients' side
that every message answered ``sent`` reaches its recipient once and in order, and where
the test is about storage, reads the recipient's whole queue on one raw connection, where
the server sends each item at most once: a message stored twice would show up twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, first_line, serve
from natsservers import NatsServer, nats_cluster, urls
from trio_websocket import open_websocket_url

from chatd.auth import load_or_create_secret, mint_token
from chatd.backends.nats.server import ServerSpec
from chatd.client import Backoff, ChatError, Client, connect
from chatd.listener import unused_port
from chatd.protocol import (
    ClientConnection,
    Error,
    ErrorCode,
    Msg,
    ProtocolError,
    Receipt,
    Sent,
)

pytestmark = pytest.mark.slow

FAST = Backoff(initial=0.05, maximum=0.5)
#: chatd's nats_timeout in these tests (seconds).
NATS_TIMEOUT = 2
#: Seconds a test waits for a cluster to recover from a failure.
RECOVERY = 30.0
STREAM = "chatd_queues"
#: Seconds a user's login takes to show on another node (presence writes last seen at
#: most once a second).
PRESENCE_LAG = 5.0


# -- a deployment: chatd nodes sharing a secret --------------------------------------------


class Deployment:
    """chatd nodes on NATS: one token secret, one TOML file of NATS settings, a data
    directory per node.

    The settings ask for 3 replicas: left to itself, a node given every server's URL
    makes its streams with 1 (a chatd bug, see
    test_a_node_given_every_url_replicates_its_streams_three_times).
    """

    def __init__(self, directory: Path, **settings: Any) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.secret_file = directory / "secret"
        self.secret = load_or_create_secret(self.secret_file)
        self.config = directory / "chatd.toml"
        self.config.write_text(toml({"nats_timeout": NATS_TIMEOUT, "shutdown_timeout": 2,
                                     "nats_replicas": 3, **settings}))

    def token(self, user: str) -> str:
        return mint_token(self.secret, user, 3600.0)

    @asynccontextmanager
    async def node(self, name: str, nats: Sequence[str], port: int = 0
                   ) -> AsyncIterator[Daemon]:
        """``chatd serve --nats URL...`` as node ``name`` until the block ends."""
        args = ["--node", name, "--secret-file", str(self.secret_file),
                "--config", str(self.config)]
        for url in nats:
            args += ["--nats", url]
        if port:
            args += ["--port", str(port)]
        async with serve(self.directory / name, *args) as daemon:
            yield daemon

    async def start(self, nursery: trio.Nursery, *nodes: tuple[Any, ...]) -> list[Daemon]:
        """Start nodes side by side, each given as ``(name, nats URLs[, port])`` and
        running until ``nursery`` is cancelled."""
        daemons: dict[str, Daemon] = {}

        async def run(name: str, nats: Sequence[str], port: int = 0, *,
                      task_status: trio.TaskStatus[Daemon]) -> None:
            async with self.node(name, nats, port) as daemon:
                task_status.started(daemon)
                await trio.sleep_forever()

        async def one(name: str, *args: Any) -> None:
            daemons[name] = await nursery.start(run, name, *args)

        async with trio.open_nursery() as starting:
            for node in nodes:
                starting.start_soon(one, *node)
        return [daemons[node[0]] for node in nodes]


def toml(settings: dict[str, Any]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def port_of(daemon: Daemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


# -- clients -------------------------------------------------------------------------------


def check_once_in_order(got: Sequence[Msg], expected: Sequence[str]) -> None:
    """The application got exactly ``expected`` (ids), once each, in that order, with
    strictly increasing sequence numbers."""
    ids = [m.id for m in got]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert not repeated, f"delivered more than once: {repeated[:10]}"
    missing = sorted(set(expected) - set(ids))
    assert not missing, f"{len(missing)} never delivered: {missing[:10]}"
    assert ids == list(expected), "delivered out of order"
    seqs = [m.seq for m in got]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs}"


async def collect(client: Client, got: list[Msg], until: str, done: trio.Event, *,
                  ack: bool = True) -> None:
    """Hand messages to the application (``got``), acknowledging each, until ``until``."""
    async for event in client.events():
        if isinstance(event, Msg):
            got.append(event)
            if ack:
                await client.ack(event.seq)
            if event.id == until:
                done.set()
        elif isinstance(event, Receipt) and ack:
            await client.ack(event.seq)


async def send_retrying(client: Client, to: str, msg_id: str, *, deadline: float = RECOVERY
                        ) -> tuple[Sent, int]:
    """Send ``msg_id`` until it is answered ``sent``, again with the same id after each
    ``store_unavailable``; the ``sent`` and how many ``store_unavailable`` came first."""
    failures = 0
    with trio.fail_after(deadline):
        while True:
            try:
                return await client.send(to, f"body of {msg_id}", id=msg_id), failures
            except ChatError as exc:
                if exc.code != "store_unavailable":
                    raise
            failures += 1
            await trio.sleep(0.05)  # the store is down: do not spin


async def drain_raw(url: str, token: str, until: str) -> list[Msg]:
    """Every message in the user's queue, read on one raw connection (no resume, nothing
    acknowledged) until ``until`` arrives: the server sends each queued item once per
    connection, so a message stored twice shows up twice.

    A node that cannot read the queue now refuses the hello, or closes the connection,
    with ``store_unavailable`` ("connect again later", docs/protocol.md 6.1): the drain
    then starts again on a new connection, until the deadline.
    """
    with trio.fail_after(RECOVERY):
        while True:
            try:
                return await _drain_once(url, token, until)
            except _Unreadable:
                await trio.sleep(0.2)


class _Unreadable(Exception):
    """The node answered ``store_unavailable`` for the queue: connect again later."""


async def _drain_once(url: str, token: str, until: str) -> list[Msg]:
    conn = ClientConnection()
    got: list[Msg] = []
    async with open_websocket_url(url, max_message_size=conn.codec.limits.max_frame_bytes
                                  ) as ws:
        await ws.send_message(conn.hello(token))
        while True:
            try:
                frames = conn.receive(await ws.get_message())
            except ProtocolError as exc:
                if exc.code is ErrorCode.STORE_UNAVAILABLE:
                    raise _Unreadable from None
                raise
            for frame in frames:
                if isinstance(frame, Error) and frame.code == "store_unavailable":
                    raise _Unreadable
                assert not isinstance(frame, Error), frame
                if isinstance(frame, Msg):
                    got.append(frame)
                    if frame.id == until:
                        return got


def check_stored_once(got: Sequence[Msg], sent: set[str], allowed: set[str] = frozenset()
                      ) -> None:
    """A raw drain of a queue: every id of ``sent`` once, nothing else but ``allowed``
    ids (at most once), and increasing sequence numbers."""
    ids = [m.id for m in got]
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    assert not repeated, f"stored more than once (under several seqs): {repeated[:10]}"
    missing = sorted(sent - set(ids))
    assert not missing, f"answered sent but lost: {missing[:10]}"
    unexpected = sorted(set(ids) - sent - allowed)
    assert not unexpected, f"never sent: {unexpected[:10]}"
    seqs = [m.seq for m in got]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs}"


# -- NATS ------------------------------------------------------------------------------------

_JS_API = """
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[3:], connect_timeout=2, allow_reconnect=False)
    try:
        reply = await nc.request("$JS.API." + sys.argv[1], sys.argv[2].encode(), timeout=2)
        sys.stdout.write(reply.data.decode())
    finally:
        await nc.close()

asyncio.run(main())
"""


async def js_api(servers: Sequence[NatsServer], subject: str, body: dict[str, Any] | None
                 = None, *, check: bool = True) -> dict[str, Any]:
    """A JetStream API request (``$JS.API.<subject>``) made by a short nats-py script; its
    answer (with ``check`` false, ``{"error": ...}`` if there was none)."""
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [sys.executable, "-c", _JS_API, subject, json.dumps(body or {}), *urls(servers)],
            capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        assert not check, result.stderr.decode()
        return {"error": result.stderr.decode().strip().splitlines()[-1:]}
    answer: dict[str, Any] = json.loads(result.stdout)
    assert not check or "error" not in answer, answer
    return answer


async def stream_info(servers: Sequence[NatsServer], stream: str = STREAM, *,
                      check: bool = True) -> dict[str, Any]:
    """The stream's ``STREAM.INFO``."""
    return await js_api(servers, f"STREAM.INFO.{stream}", check=check)


async def wait_for_stream_leader(servers: Sequence[NatsServer], stream: str = STREAM,
                                 expected: str | None = None) -> str:
    """Wait until the stream has a leader (``expected``, if given); its name."""
    with trio.fail_after(RECOVERY):
        while True:
            info = await stream_info(servers, stream, check=False)
            leader = info.get("cluster", {}).get("leader")
            if leader and leader == (expected or leader):
                return str(leader)
            await trio.sleep(0.2)


async def wait_until_current(servers: Sequence[NatsServer], streams: Sequence[str]) -> None:
    """Wait until each stream has a leader and every replica has caught up with it."""
    with trio.fail_after(RECOVERY):
        for stream in streams:
            while True:
                cluster = (await stream_info(servers, stream, check=False)).get("cluster", {})
                replicas = cluster.get("replicas", [])
                if cluster.get("leader") and len(replicas) == len(servers) - 1 and all(
                        r.get("current") for r in replicas):
                    break
                await trio.sleep(0.2)


def by_name(servers: Sequence[NatsServer], name: str) -> NatsServer:
    return next(server for server in servers if server.spec.name == name)


# -- 1. chatting across nodes ------------------------------------------------------------------


@asynccontextmanager
async def three_nodes(tmp_path: Path) -> AsyncIterator[tuple[list[NatsServer], Deployment,
                                                             list[Daemon], trio.Nursery]]:
    """Three nats-servers as one cluster and three chatd nodes n1, n2, n3 given every
    server's URL; a nursery for the test's own tasks, cancelled at the end."""
    with nats_cluster(tmp_path / "nats") as servers:
        chat = Deployment(tmp_path / "chatd")
        async with trio.open_nursery() as nursery:
            nodes = await chat.start(nursery, *((f"n{i}", urls(servers)) for i in (1, 2, 3)))
            yield servers, chat, nodes, nursery
            nursery.cancel_scope.cancel()


async def test_users_on_two_nodes_chat_with_receipts_and_presence(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as (_, chat, (n1, n2, _), _):
        with trio.fail_after(DEADLINE):
            async with (connect(n1.url, chat.token("alice")) as alice,
                        connect(n2.url, chat.token("bob")) as bob):
                sent = await alice.send("bob", "hello bob", id="m1")
                assert (sent.id, sent.dup) == ("m1", False)
                async for event in bob.events():
                    if isinstance(event, Msg):
                        break
                assert (event.id, event.sender, event.body) == ("m1", "alice", "hello bob")
                assert event.ts == sent.ts
                await bob.read(event.seq)
                statuses = []
                async for receipt in alice.events():
                    if isinstance(receipt, Receipt):
                        assert (receipt.by, receipt.ids) == ("bob", ["m1"]), receipt
                        statuses.append(receipt.status)
                        await alice.ack(receipt.seq)
                        if receipt.status == "read":
                            break
                assert statuses == ["delivered", "read"]
                # bob's node tells alice's: it writes last seen to the presence
                # bucket at most once a second (chatd.presence.FLUSH_INTERVAL), so
                # the first answers on another node may predate bob's login.
                started = trio.current_time()
                with trio.fail_after(PRESENCE_LAG):
                    while not (presence := await alice.last_seen("bob")).online:
                        await trio.sleep(0.1)
                print(f"bob online on alice's node after "
                      f"{trio.current_time() - started:.2f} s")
                assert presence.user == "bob" and presence.last_seen is not None
        for daemon in (n1, n2):
            assert not daemon.errors(), daemon.errors()


# -- 1b. replicas -------------------------------------------------------------------------------


async def test_a_node_given_every_url_replicates_its_streams_three_times(tmp_path: Path
                                                                          ) -> None:
    with nats_cluster(tmp_path / "nats") as servers:
        chat = Deployment(tmp_path / "chatd", nats_replicas=0)  # chatd's default
        async with chat.node("n1", urls(servers)) as n1:
            created = n1.events("nats_stream_created")
            assert created and {e["chatd.replicas"] for e in created} == {3}, created
            info = await stream_info(servers)
            assert info["config"]["num_replicas"] == 3
            assert len(info["cluster"]["replicas"]) == 2, info["cluster"]


# -- 2. a chatd node SIGKILLed under its client -------------------------------------------------


async def test_recipient_fails_over_when_its_node_is_killed(tmp_path: Path) -> None:
    """bob listens with ``chatd listen --url N2 --url N3``; N2 is SIGKILLed while alice
    sends 200 messages: bob's listener fails over to N3 and prints all 200, once each, in
    the order sent, and alice got ``sent`` for every one."""
    total, kill_at = 200, 60
    ids = [f"m{i:03d}" for i in range(total)]
    async with (three_nodes(tmp_path) as (_, chat, (n1, n2, n3), nursery),
                connect(n1.url, chat.token("alice")) as alice):
        listen = await trio.lowlevel.open_process(
            [*CHATD, "listen", "--url", n2.url, "--url", n3.url, "--token", chat.token("bob"),
             "--count", str(total + 1), "--timeout", str(RECOVERY)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert listen.stdout is not None and listen.stderr is not None
        # The listener is connected (to N2) once it has printed a first message.
        await alice.send("bob", "before", id="before")
        printed = await first_line(listen.stdout)
        assert b'"id":"before"' in printed

        async def read_all(stream: trio.abc.ReceiveStream) -> None:
            nonlocal printed
            async for chunk in stream:
                printed += chunk

        nursery.start_soon(read_all, listen.stdout)
        with trio.fail_after(DEADLINE):
            answers = []
            for i, msg_id in enumerate(ids):
                if i == kill_at:
                    await n2.crash()
                answers.append(await alice.send("bob", f"body of {msg_id}", id=msg_id))
        with trio.fail_after(RECOVERY + DEADLINE):
            status = await listen.wait()
        assert status == 0, (await listen.stderr.receive_some()).decode()
        assert [s.id for s in answers] == ids and not any(s.dup for s in answers)
        lines = [json.loads(line) for line in printed.decode().splitlines()]
        assert [line["id"] for line in lines] == ["before", *ids]  # once each, in order
        assert [line["body"] for line in lines[1:]] == [f"body of {i}" for i in ids]
        seqs = [line["seq"] for line in lines]
        assert seqs == sorted(set(seqs))


# -- 3. the stream's leader SIGKILLed ------------------------------------------------------------


async def test_sends_resume_after_the_stream_leader_is_killed(tmp_path: Path) -> None:
    total, kill_at = 200, 50
    ids = [f"m{i:03d}" for i in range(total)]
    async with three_nodes(tmp_path) as (servers, chat, (n1, n2, n3), nursery):
        got: list[Msg] = []
        received = trio.Event()
        async with (connect([n1.url, n3.url], chat.token("alice"), backoff=FAST) as alice,
                    connect([n2.url, n3.url], chat.token("bob"), backoff=FAST) as bob):
            nursery.start_soon(collect, bob, got, ids[-1], received)
            answers: list[Sent] = []
            failures: dict[str, int] = {}
            answered_at: list[float] = []
            for i, msg_id in enumerate(ids):
                if i == kill_at:
                    info = await stream_info(servers)
                    assert info["config"]["num_replicas"] == 3, info["config"]
                    leader = by_name(servers, info["cluster"]["leader"])
                    leader.kill()
                    killed_at = trio.current_time()
                sent, failed = await send_retrying(alice, "bob", msg_id)
                answered_at.append(trio.current_time())
                answers.append(sent)
                if failed:
                    failures[msg_id] = failed
            # Sends stalled (failed, or waited) from the kill until the first `sent`
            # of a message sent after it.
            resumed = answered_at[kill_at] - killed_at
            print(f"killed the stream leader {leader.spec.name}; sends resumed after "
                  f"{resumed:.1f} s; store_unavailable answers: {sum(failures.values())} "
                  f"(for {len(failures)} messages)")
            assert resumed < RECOVERY
            with trio.fail_after(DEADLINE):
                await received.wait()
            # The stream has a new leader among the two others.
            info = await stream_info([s for s in servers if s is not leader])
            assert info["cluster"]["leader"] not in (None, leader.spec.name), info["cluster"]
        assert [s.id for s in answers] == ids
        # A message answered store_unavailable may have been stored all the same: its
        # re-send is then a duplicate. Any other duplicate is a bug.
        assert not [s.id for s in answers if s.dup and s.id not in failures]
        check_once_in_order(got, ids)


# -- 4. a partition --------------------------------------------------------------------------------


class Relay:
    """A TCP relay to a server's cluster port, which the test can cut: :meth:`cut` closes
    every connection through it and refuses new ones until :meth:`heal`.

    Attributes:
        port: Where it listens.
        upstream: The local ports of its connections to the target (what the target sees
            as their peers).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.upstream: set[int] = set()
        self.connections = 0
        self._open = True
        self._links: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._relay, listeners)
            task_status.started(self)

    def cut(self) -> None:
        self._open = False
        for link in self._links:
            link.cancel()

    def heal(self) -> None:
        self._open = True

    async def _relay(self, inbound: trio.SocketStream) -> None:
        async with inbound:
            if not self._open:
                return
            try:
                outbound = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            self.upstream.add(outbound.socket.getsockname()[1])
            self.connections += 1
            with trio.CancelScope() as link:
                self._links.add(link)
                try:
                    async with outbound, trio.open_nursery() as nursery:

                        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                            try:
                                while data := await src.receive_some():
                                    await dst.send_all(data)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(pump, inbound, outbound)
                        nursery.start_soon(pump, outbound, inbound)
                finally:
                    self._links.discard(link)


def cluster_block(port: int, routes: Sequence[int], advertise: int = 0) -> str:
    lines = ["cluster {", '  name: "chatd"', f'  listen: "127.0.0.1:{port}"']
    if advertise:
        lines.append(f'  advertise: "127.0.0.1:{advertise}"')
    lines.append("  routes: [" + ", ".join(f'"nats-route://127.0.0.1:{route}"'
                                            for route in routes) + "]")
    return "\n".join([*lines, "}", ""])


_ROUTE = re.compile(r"\] 127\.0\.0\.1:(\d+) - rid:\d+ - Route connection created")


def route_peers(server: NatsServer) -> list[int]:
    """The peer port of every route connection ``server`` logged."""
    return [int(m.group(1)) for line in list(server.lines) if (m := _ROUTE.search(line))]


@attrs.define
class Split:
    """Three nats-servers of which the third can be cut off from the other two, a chatd
    node on the first two (``majority``) and one attached only to the third
    (``isolated``)."""

    chat: Deployment
    servers: list[NatsServer]
    relays: list[Relay]
    majority: Daemon
    isolated: Daemon

    def cut(self) -> None:
        for relay in self.relays:
            relay.cut()

    def heal(self) -> None:
        for relay in self.relays:
            relay.heal()


@asynccontextmanager
async def split_cluster(directory: Path) -> AsyncIterator[Split]:
    """nats-1 and nats-2 route to each other directly; every route to or from nats-3 goes
    through a relay: nats-1 and nats-2 dial nats-3 through ``into_3``, which nats-3 also
    advertises (so that servers learning of it by gossip use it too), and nats-3 dials each
    of them through a relay of its own. Cutting closes all three.

    On exit, checks in the servers' logs that no route of nats-3 went around the relays.
    """
    ports = [unused_port()]
    for _ in range(5):
        ports.append(unused_port(exclude=frozenset(ports)))
    client_ports, cluster_ports = ports[:3], ports[3:]
    async with trio.open_nursery() as nursery:
        into_3 = await nursery.start(Relay(cluster_ports[2]).run)
        from_3 = [await nursery.start(Relay(cluster_ports[i]).run) for i in (0, 1)]
        routes = [[cluster_ports[1], into_3.port], [cluster_ports[0], into_3.port],
                  [relay.port for relay in from_3]]
        servers: list[NatsServer] = []
        for i in range(3):
            spec = ServerSpec(f"nats-{i + 1}", "127.0.0.1", client_ports[i],
                              directory / "nats" / "js" / f"nats-{i + 1}")
            text = cluster_block(cluster_ports[i], routes[i],
                                 advertise=into_3.port if i == 2 else 0)
            servers.append(NatsServer(spec, directory / "nats", extra=text))
        nats1, nats2, nats3 = servers
        try:
            # (In threads: the relays run in this thread's event loop.)
            for server in servers:
                await trio.to_thread.run_sync(server.start)
            for server in servers:
                await trio.to_thread.run_sync(server.wait_for, "metadata leader")
            chat = Deployment(directory / "chatd")
            async with trio.open_nursery() as nodes:
                majority, isolated = await chat.start(
                    nodes, ("n12", [nats1.url, nats2.url]), ("n3", [nats3.url]))
                yield Split(chat, servers, [into_3, *from_3], majority, isolated)
                nodes.cancel_scope.cancel()
        finally:
            for server in servers:
                await trio.to_thread.run_sync(server.stop)
        # No route of nats-3 went around the relays: it dialled only theirs, and every
        # route it accepted came through into_3.
        peers = route_peers(nats3)
        assert peers, nats3.lines
        bypass = set(peers) - {relay.port for relay in from_3} - into_3.upstream
        assert not bypass, f"nats-3 has routes around the relays: {bypass}"
        for server in (nats1, nats2):
            assert cluster_ports[2] not in route_peers(server), "dialled nats-3 directly"
        nursery.cancel_scope.cancel()


async def answers(client: Client, ids: Sequence[str]) -> dict[str, Sent | Error]:
    """Pipeline ``ids`` (to bob) and wait for the answer to each."""
    got: dict[str, Sent | Error] = {}
    await client.submit([(i, "bob", f"body of {i}") for i in ids])
    with trio.fail_after(len(ids) * NATS_TIMEOUT + DEADLINE):
        async for event in client.events():
            if isinstance(event, Sent):
                got[event.id] = event
            elif isinstance(event, Error) and event.ref is not None:
                got[event.ref] = event
            if len(got) == len(ids):
                break
    return got


QUEUES_AND_BUCKETS = (STREAM, "KV_chatd_sessions", "KV_chatd_presence")


async def test_a_partitioned_server_refuses_sends_and_healing_loses_nothing(
        tmp_path: Path) -> None:
    before = [f"a-before-{i}" for i in range(5)]
    during = [f"a-during-{i}" for i in range(4)]
    majority_ids = [f"c-during-{i}" for i in range(5)]
    refused: dict[str, Sent | Error] = {}
    async with split_cluster(tmp_path) as split:
        chat, majority, isolated = split.chat, split.majority, split.isolated
        async with (connect(isolated.url, chat.token("alice")) as alice,
                    connect(majority.url, chat.token("carol")) as carol):
            with trio.fail_after(DEADLINE):
                for msg_id in before:
                    await alice.send("bob", f"body of {msg_id}", id=msg_id)
            # The queues' leader is the server about to be cut off.
            if await wait_for_stream_leader(split.servers) != "nats-3":
                await js_api(split.servers, f"STREAM.LEADER.STEPDOWN.{STREAM}",
                             {"placement": {"preferred": "nats-3"}})
                await wait_for_stream_leader(split.servers, expected="nats-3")
            # The cut. Sends on the isolated node are refused at once, and still once the
            # majority has elected the leaders it lacked and takes sends again.
            split.cut()
            cut_at = trio.current_time()

            async def on_majority() -> None:
                for msg_id in majority_ids:
                    await send_retrying(carol, "bob", msg_id)
                    if msg_id == majority_ids[0]:
                        print(f"the majority side took sends again "
                              f"{trio.current_time() - cut_at:.1f} s after the cut")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_majority)
                refused |= await answers(alice, during[:2])
            refused |= await answers(alice, during[2:])
            assert not [i for i, a in refused.items() if isinstance(a, Sent)], (
                "answered sent while cut off")
            assert {a.code for a in refused.values()} == {"store_unavailable"}, refused
            # ... and made while the isolated node was connected to the isolated server.
            assert not isolated.events("nats_disconnected"), isolated.events(
                "nats_disconnected")
            # Healed, and once nats-3 has caught up, the refused messages go again, with
            # the same ids, on the same node.
            split.heal()
            healed_at = trio.current_time()
            await wait_until_current(split.servers, QUEUES_AND_BUCKETS)
            print(f"nats-3 had caught up {trio.current_time() - healed_at:.1f} s after "
                  "healing")
            for msg_id in during:
                await send_retrying(alice, "bob", msg_id)
            await send_retrying(alice, "bob", "probe")
        sent = {*before, *during, *majority_ids, "probe"}
        for node in (majority, isolated):
            got = await drain_raw(node.url, chat.token("bob"), "probe")
            check_stored_once(got, sent)
            for ids in (before, during, majority_ids):
                assert [m.id for m in got if m.id in ids] == ids, "out of the order sent"
        for node in (majority, isolated):
            assert not node.errors(), node.errors()


# -- 5. everything SIGKILLed at once ---------------------------------------------------------------


async def pipeline(client: Client, to: str, ids: Sequence[str], sent: list[str],
                   enough: trio.Event, threshold: int) -> None:
    """Pipeline ``ids`` to ``to`` in chunks and record every id answered ``sent``, setting
    ``enough`` once ``threshold`` have been; ends when the connection does."""
    chunk = 20
    for start in range(0, len(ids), chunk):
        await client.submit([(i, to, f"body of {i}") for i in ids[start:start + chunk]])
    async for event in client.events():
        if isinstance(event, Sent):
            assert not event.dup, event
            sent.append(event.id)
            if len(sent) >= threshold:
                enough.set()
        elif isinstance(event, Error):
            assert event.code == "store_unavailable", event


async def test_everything_killed_at_once_loses_no_sent_message(tmp_path: Path) -> None:
    total, kill_after = 400, 150
    ids = [f"m{i:03d}" for i in range(total)]
    with nats_cluster(tmp_path / "nats") as servers:
        # (Restarted with the servers, the nodes wait for JetStream to elect its leaders
        # for up to three times nats_timeout.)
        chat = Deployment(tmp_path / "chatd", nats_timeout=5)
        names = ("n1", "n2", "n3")
        sent: list[str] = []
        enough = trio.Event()
        async with trio.open_nursery() as nursery:
            nodes = await chat.start(nursery, *((name, urls(servers)) for name in names))
            ports = [port_of(node) for node in nodes]
            async with connect(nodes[0].url, chat.token("alice")) as alice:
                nursery.start_soon(pipeline, alice, "bob", ids, sent, enough, kill_after)
                with trio.fail_after(DEADLINE):
                    await enough.wait()
                for process in [*(s.process for s in servers), *(n.process for n in nodes)]:
                    assert process is not None
                    process.kill()
                answered = list(sent)
                for server in servers:
                    server.kill()  # reap
                for node in nodes:
                    await node.crash()
            nursery.cancel_scope.cancel()
        assert len(answered) >= kill_after
        print(f"{len(answered)} of {total} messages answered sent before the kill")

        for server in servers:  # same ports, same store directories
            await trio.to_thread.run_sync(server.start)
        restart_began = trio.current_time()
        async with trio.open_nursery() as nursery:
            restarted = await chat.start(nursery, *(
                (name, urls(servers), port) for name, port in zip(names, ports, strict=True)))
            print(f"the nodes served again {trio.current_time() - restart_began:.1f} s after "
                  "the servers, having waited for JetStream "
                  f"{sum(len(n.events('nats_not_ready')) for n in restarted)} times")
            for node in restarted:
                assert not node.errors(), node.errors()
            async with connect(restarted[1].url, chat.token("alice")) as alice:
                await send_retrying(alice, "bob", "probe")
            got = await drain_raw(restarted[2].url, chat.token("bob"), "probe")
            check_stored_once(got, {*answered, "probe"}, allowed=set(ids))
            order = [ids.index(m.id) for m in got[:-1]]
            assert order == sorted(order), "stored out of the order sent"
            nursery.cancel_scope.cancel()
