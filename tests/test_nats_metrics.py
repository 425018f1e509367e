"""The NATS engine's metrics and replica alarm, on real nats-servers, read from /metrics.

Nodes run in the test's process (so the queue stream's info can be read often, and the
stream changed through the node's own JetStream API) on real nats-server processes: the
session's shared server where nothing is done to the server, a server of the test's own
where it is paused, killed or its stream changed, and a cluster of three for the replicas.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import RunningNode
from natsservers import NatsServer, nats_cluster, nats_server, urls
from test_http import delta, scrape
from test_node import Peer, login

from chatd.actors import ActorTable
from chatd.auth import load_or_create_secret
from chatd.backends.nats._backend import NatsBackend
from chatd.client import ChatError
from chatd.config import load_config
from chatd.node import Node
from chatd.protocol import Receipt

pytestmark = pytest.mark.slow

#: chatd's nats_timeout in these tests (seconds).
NATS_TIMEOUT = 2.0
#: Seconds a test waits for a figure or an event.
DEADLINE = 20.0
REASONS = ("disconnected", "timeout", "no_responders", "refused", "other")
_namespaces = itertools.count(1)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``chatd`` records propagate to caplog even if a test configured JSON logging."""
    monkeypatch.setattr(logging.getLogger("chatd"), "propagate", True)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every captured record of event ``name``."""
    return [dict(getattr(r, "chatd_fields", {})) for r in caplog.records if r.msg == name]


@asynccontextmanager
async def running_node(directory: Path, nats: Sequence[str], *, name: str = "n1",
                       interval: float = 0.1, **settings: Any
                       ) -> AsyncIterator[RunningNode]:
    """A node on ``nats`` whose backend reads the queue stream every ``interval`` s,
    stopped when the block ends (so before the servers it runs on)."""
    settings.setdefault("nats_namespace", f"metrics{next(_namespaces)}")
    config = load_config(data_dir=directory / name, node=name, port=0,
                         http_listen="127.0.0.1:0", nats=list(nats),
                         nats_timeout=NATS_TIMEOUT, **settings)
    backend = NatsBackend(config, ActorTable(config.node), monitor_interval=interval)
    node = Node(config, backend=backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        yield RunningNode(node, load_or_create_secret(config.secret_path))
        nursery.cancel_scope.cancel()


def backend_of(node: RunningNode) -> NatsBackend:
    backend = node.node.backend
    assert isinstance(backend, NatsBackend)
    return backend


async def scrape_until(node: RunningNode, condition: Callable[[Samples], bool],
                       what: str) -> Samples:
    """Scrape ``node`` until ``condition`` holds of its samples (within the deadline)."""
    samples: Samples = {}
    with trio.move_on_after(DEADLINE):
        while not condition(samples := await scrape(node)):
            await trio.sleep(0.05)
        return samples
    ours = ("chatd_nats", "chatd_queue", "chatd_replica")
    raise AssertionError(f"not within {DEADLINE} s: {what}; last scrape: "
                         f"{ {k: v for k, v in samples.items() if k[0].startswith(ours)} }")


def errors(before: Samples, after: Samples) -> dict[str, float]:
    """How many publish errors of each reason were counted between two scrapes."""
    return {reason: delta(before, after, "chatd_nats_publish_errors_total", reason=reason)
            for reason in REASONS}


def published(before: Samples, after: Samples) -> float:
    """How many publishes the latency histogram took in between two scrapes."""
    count = delta(before, after, "chatd_nats_publish_seconds_count")
    assert delta(before, after, "chatd_nats_publish_seconds_bucket", le="+Inf") == count
    return count


async def refused_send(peer: Peer, text: str) -> None:
    """``peer`` sends a message to bob, which is answered ``store_unavailable``."""
    with trio.fail_after(NATS_TIMEOUT + DEADLINE), pytest.raises(ChatError) as refused:
        await peer.client.send("bob", text)
    assert refused.value.code == "store_unavailable", refused.value


# -- publish latency -------------------------------------------------------------------------


async def test_publish_latency_counts_each_message_sent_through_its_node(
        tmp_path: Path, shared_nats: NatsServer) -> None:
    """Two nodes on one namespace: each node's histogram takes exactly the messages sent
    through it (a duplicate send, acknowledged by JetStream as one, too), and nothing else
    (logins, acknowledgements and receipts are other writes)."""
    namespace = f"metrics{next(_namespaces)}"
    async with (running_node(tmp_path, [shared_nats.url], name="n1",
                             nats_namespace=namespace) as n1,
                running_node(tmp_path, [shared_nats.url], name="n2",
                             nats_namespace=namespace) as n2):
        before1, before2 = await scrape(n1), await scrape(n2)
        async with login(n1, "alice") as alice, login(n2, "carol") as carol:
            for n in range(4):
                await alice.client.send("bob", f"hello {n}", id=f"a{n}")
            await alice.client.send("bob", "hello 0", id="a0")  # a duplicate
            for n in range(2):
                await carol.client.send("alice", f"hi {n}")
            msgs = await alice.msgs(2)
            await alice.client.read(msgs[-1].seq)  # an acknowledgement and a receipt
            await carol.next(Receipt)  # the acknowledgement is written
        after1, after2 = await scrape(n1), await scrape(n2)
    assert published(before1, after1) == 5
    assert published(before2, after2) == 2
    assert delta(before1, after1, "chatd_nats_publish_seconds_sum") > 0
    # Every one was acknowledged within the last bucket's bound (1 s), on loopback.
    assert delta(before1, after1, "chatd_nats_publish_seconds_bucket", le="1.0") == 5
    assert set(errors(before1, after1).values()) == {0.0}
    assert set(errors(before2, after2).values()) == {0.0}


# -- publish errors --------------------------------------------------------------------------


async def test_publish_errors_count_jetstream_refusals_and_missing_streams(
        tmp_path: Path) -> None:
    """A message larger than the stream takes is ``refused``; once the stream is deleted,
    a message is ``no_responders``. Each failed send counts once, under its reason only,
    and not in the latency histogram."""
    with nats_server(tmp_path / "nats") as server:
        async with (running_node(tmp_path, [server.url]) as node,
                    login(node, "alice") as alice):
            js, stream = backend_of(node).jetstream, backend_of(node).names.stream
            config = (await js.api(f"STREAM.INFO.{stream}"))["config"]
            await js.api(f"STREAM.UPDATE.{stream}", {**config, "max_msg_size": 16})
            before = await scrape(node)
            await refused_send(alice, "larger than 16 bytes")
            after = await scrape(node)
            assert errors(before, after) == {**dict.fromkeys(REASONS, 0.0), "refused": 1.0}

            await js.api(f"STREAM.DELETE.{stream}")
            await refused_send(alice, "no stream")
            last = await scrape(node)
            assert errors(after, last) == {**dict.fromkeys(REASONS, 0.0),
                                           "no_responders": 1.0}
            assert published(before, last) == 0


async def test_publish_errors_count_timeouts_and_a_lost_connection(tmp_path: Path) -> None:
    """A paused nats-server lets a send time out (``timeout``); a killed one makes the
    next send fail at once (``disconnected``). Each counts once, under its reason only."""
    with nats_server(tmp_path / "nats") as server:
        async with (running_node(tmp_path, [server.url]) as node,
                    login(node, "alice") as alice):
            await alice.client.send("bob", "stored")
            before = await scrape(node)
            server.pause()  # connected, silent: the publish is not answered
            try:
                await refused_send(alice, "not answered")
            finally:
                server.resume()
            after = await scrape(node)
            assert errors(before, after) == {**dict.fromkeys(REASONS, 0.0), "timeout": 1.0}

            server.kill()
            bridge = backend_of(node).bridge
            with trio.fail_after(DEADLINE):
                while bridge.connected:
                    await trio.sleep(0.01)
            await refused_send(alice, "no connection")
            last = await scrape(node)
            assert errors(after, last) == {**dict.fromkeys(REASONS, 0.0),
                                           "disconnected": 1.0}
            assert published(before, last) == 0


# -- the queue stream's backlog ------------------------------------------------------------


async def test_backlog_counts_queued_messages_until_they_are_acknowledged(
        tmp_path: Path, shared_nats: NatsServer) -> None:
    """Messages for an offline user add to the queue stream's items and bytes; once the
    user has read and acknowledged them they are removed, and the figures drop. A stream
    of one replica never raises ``chatd_replica_unreadable``."""
    body = "x" * 2000
    items_key, bytes_key = ("chatd_queue_backlog_items", ()), ("chatd_queue_backlog_bytes", ())
    async with running_node(tmp_path, [shared_nats.url]) as node:
        base = await scrape_until(node, lambda s: items_key in s,
                                  "a first reading of the queue stream")
        items, size = base[items_key], base[bytes_key]
        async with login(node, "alice") as alice:
            for n in range(5):
                await alice.client.send("bob", body, id=f"m{n}")
        full = await scrape_until(node, lambda s: s[items_key] == items + 5,
                                  "the five messages counted")
        assert full[bytes_key] > size + 5 * len(body)

        async with login(node, "bob") as bob:
            msgs = await bob.msgs(5)
            await bob.client.ack(msgs[-1].seq)
            # Removed within a second (NatsQueues.retry); an acknowledgement record, the
            # ids of the five and alice's receipt stay, not the bodies.
            last = await scrape_until(node, lambda s: s[bytes_key] < size + len(body),
                                      "the acknowledged messages removed")
        assert items < last[items_key] < items + 5
        assert last[("chatd_replica_unreadable", ())] == 0


# -- replica_unreadable -----------------------------------------------------------------------


async def test_a_lost_replica_raises_replica_unreadable_and_its_return_clears_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three nats-servers, the queue stream on all three: SIGKILL one that neither leads
    the stream nor serves the node, and send a message, and the alarm is raised once,
    naming it; restart it, and the alarm is cleared once."""
    caplog.set_level(logging.INFO, logger="chatd")
    gauge = ("chatd_replica_unreadable", ())
    with nats_cluster(tmp_path / "nats") as servers:
        async with running_node(tmp_path, urls(servers)[:1], interval=1.0,
                                nats_replicas=3) as node:
            backend = backend_of(node)
            stream = backend.names.stream
            with trio.fail_after(DEADLINE):
                while True:  # every replica current, and any alarm of the start over
                    info = await backend.jetstream.api(f"STREAM.INFO.{stream}")
                    cluster = info["cluster"]
                    replicas = cluster.get("replicas", [])
                    if (cluster.get("leader") and len(replicas) == 2 and all(
                            r.get("current") for r in replicas)
                            and not backend.watch.raised):
                        break
                    await trio.sleep(0.1)
            raised = len(events(caplog, "replica_unreadable"))
            cleared = len(events(caplog, "replica_unreadable_cleared"))
            victim = next(server for server in servers[1:]
                          if server.spec.name != cluster["leader"])
            async with login(node, "alice") as alice:
                victim.kill()
                await alice.client.send("bob", "behind on one replica")
            await scrape_until(node, lambda s: s[gauge] == 1, "the alarm raised")
            assert [(e["stream"], e["unreadable"], e["error"])
                    for e in events(caplog, "replica_unreadable")[raised:]] == [
                (stream, [victim.spec.name], "replica_unreadable")]

            await trio.to_thread.run_sync(victim.start)
            await scrape_until(node, lambda s: s[gauge] == 0, "the alarm cleared")
            assert [e["stream"] for e in events(caplog, "replica_unreadable_cleared")[
                cleared:]] == [stream]
            assert len(events(caplog, "replica_unreadable")) == raised + 1
