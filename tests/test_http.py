"""The node's HTTP front on a real node: health, readiness and metrics, read with a real
HTTP client (httpx) and parsed with prometheus_client's own parser; its limits against
slow, oversized and malformed requests, with the WebSocket port's sessions undisturbed.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import yaml
from conftest import RunningNode
from daemons import refusing_url, run
from natsservers import nats_server
from prometheus_client.parser import text_string_to_metric_families
from test_node import exchange, login

from chatd.config import ConfigError, load_config
from chatd.http._front import HEAD_BYTES, KEEP_ALIVE_TIMEOUT, READ_TIMEOUT
from chatd.node import Node
from chatd.protocol import Receipt

MakeNode = Callable[..., Any]
TIMEOUT = 10.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the tests that ask for it: it jumps ahead once every task has
    waited 20 ms of real time (long enough for loopback bytes to arrive first)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@pytest.fixture(params=["embedded", "nats"])
def engine(request: pytest.FixtureRequest) -> str:
    """The metrics and readiness tests run on both engines."""
    return str(request.param)


def http_url(node: RunningNode) -> str:
    assert node.node.http is not None and node.node.http.url
    return node.node.http.url


async def scrape(node: RunningNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, by name and labels."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.get(f"{http_url(node)}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def delta(before: dict[Any, float], after: dict[Any, float], name: str,
          **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_exactly_the_traffic(chat_node: RunningNode) -> None:
    before = await scrape(chat_node)
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        sent = [await alice.client.send("bob", f"hello {n}") for n in range(3)]
        await alice.client.send("bob", "hello 0", id=sent[0].id)  # a duplicate: no message
        msgs = await bob.msgs(3)
        await bob.client.ack(msgs[-1].seq)
        await bob.client.read(msgs[1].seq)
        receipts = [await alice.next(Receipt) for _ in range(2)]
        assert [r.status for r in receipts] == ["delivered", "read"]
        during = await scrape(chat_node)
        assert during[("chatd_sessions", ())] == 2
        assert during[("chatd_connections", (("state", "open"),))] == 2
    after = await scrape(chat_node)
    counts = {
        ("chatd_messages_total", "status", "sent"): 3,
        ("chatd_messages_total", "status", "delivered"): 3,
        ("chatd_messages_total", "status", "read"): 2,
        ("chatd_frames_received_total", "type", "hello"): 2,
        ("chatd_frames_received_total", "type", "send"): 4,
        ("chatd_frames_received_total", "type", "ack"): 2,
        ("chatd_frames_sent_total", "type", "welcome"): 2,
        ("chatd_frames_sent_total", "type", "sent"): 4,
        ("chatd_frames_sent_total", "type", "msg"): 3,
        ("chatd_frames_sent_total", "type", "receipt"): 2,
    }
    for (name, label, value), expected in counts.items():
        assert delta(before, after, name, **{label: value}) == expected, (name, value)
    assert delta(before, after, "chatd_send_latency_seconds_count") == 4
    assert delta(before, after, "chatd_send_latency_seconds_bucket", le="+Inf") == 4
    # Hop 2: each message stored while bob was online and written to him; hop 3: each
    # covered by his first acknowledgement (the read one finds nothing left to time).
    assert delta(before, after, "chatd_delivery_latency_seconds_count") == 3
    assert delta(before, after, "chatd_ack_latency_seconds_count") == 3
    assert delta(before, after, "chatd_ack_latency_seconds_bucket", le="+Inf") == 3
    assert delta(before, after, "chatd_errors_total", code="id_conflict") == 0
    assert after[("chatd_ready", ())] == 1
    assert after[("process_open_fds", ())] > 0
    assert not [key for key in after if "alice" in str(key) or "bob" in str(key)]


async def test_a_backlog_is_timed_from_its_write_to_its_ack_only(
        chat_node: RunningNode) -> None:
    async with login(chat_node, "alice") as alice:
        await alice.client.send("carol", "while you were away")
    before = await scrape(chat_node)
    async with login(chat_node, "carol") as carol:
        (msg,) = await carol.msgs(1)
        await carol.client.ack(msg.seq)
        await carol.client.ack(msg.seq)  # again: nothing left to time
        await carol.client.send("alice", "thanks")  # answered after the acks are handled
    after = await scrape(chat_node)
    assert delta(before, after, "chatd_frames_sent_total", type="msg") == 1
    assert delta(before, after, "chatd_delivery_latency_seconds_count") == 0
    assert delta(before, after, "chatd_ack_latency_seconds_count") == 1


async def test_garbage_collections_are_timed(chat_node: RunningNode) -> None:
    before = await scrape(chat_node)
    gc.collect()  # the node runs in this process
    after = await scrape(chat_node)
    assert delta(before, after, "chatd_gc_pause_seconds_count", generation="2") >= 1
    assert delta(before, after, "chatd_gc_pause_seconds_sum", generation="2") > 0
    assert after[("python_gc_collections_total", (("generation", "2"),))] >= 1


async def test_errors_are_counted_by_code(chat_node: RunningNode) -> None:
    before = await scrape(chat_node)
    async with login(chat_node, "alice") as alice:
        await alice.client.send("bob", "first", id="m1")
        with pytest.raises(Exception, match="id_conflict"):
            await alice.client.send("carol", "same id", id="m1")
    after = await scrape(chat_node)
    assert delta(before, after, "chatd_errors_total", code="id_conflict") == 1
    assert delta(before, after, "chatd_frames_sent_total", type="error") == 1


async def test_health_and_readiness(chat_node: RunningNode) -> None:
    async with httpx.AsyncClient(base_url=http_url(chat_node), timeout=TIMEOUT) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        missing = await http.get("/nowhere")
        assert (missing.status_code, missing.json()["status"]) == (404, "error")
        assert (await http.post("/metrics")).status_code == 405


async def test_readyz_turns_503_when_a_replica_fails_and_200_after_a_restart(
        make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        engine: str) -> None:
    if engine != "embedded":
        pytest.skip("replicas are the embedded engine's; NATS: test_readyz_follows_nats")
    real_fsync = os.fsync
    failing = (tmp_path / "data" / "store" / "1").resolve()

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(failing):
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)

    node = await make_node()
    async with httpx.AsyncClient(base_url=http_url(node), timeout=TIMEOUT) as http:
        assert (await http.get("/readyz")).status_code == 200
        monkeypatch.setattr("chatd.backends.embedded._segments.os.fsync", fsync)
        async with login(node, "alice") as alice:
            with pytest.raises(Exception, match="store_unavailable"):
                await alice.client.send("bob", "lost to the failed replica")
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        body = answer.json()
        assert (body["status"], body["check"]) == ("unavailable", "store")
        assert "injected I/O error" in body["reason"]
        assert (await http.get("/healthz")).status_code == 200  # it still serves
    node.node.request_shutdown()
    monkeypatch.undo()
    with trio.fail_after(TIMEOUT):
        while node.node.listener is not None and node.node.listener.live_sessions:
            await trio.sleep(0.01)
    again = await make_node(data_dir=tmp_path / "data2")
    async with httpx.AsyncClient(base_url=http_url(again), timeout=TIMEOUT) as http:
        assert (await http.get("/readyz")).status_code == 200


async def test_http_port_off_and_bad_addresses(tmp_path: Path) -> None:
    assert load_config(data_dir=tmp_path, http_listen="").http_listen == ""
    for bad in ("8766", "localhost", "127.0.0.1:99999", ":8766"):
        with pytest.raises(ConfigError, match="http_listen"):
            load_config(data_dir=tmp_path, http_listen=bad)


async def test_bad_http_requests_are_closed_and_sessions_go_on(
        chat_node: RunningNode) -> None:
    host, port = http_url(chat_node).removeprefix("http://").rsplit(":", 1)
    async with login(chat_node, "alice") as alice, login(chat_node, "bob") as bob:
        for request in (b"GARBAGE\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 8 * HEAD_BYTES
                        + b"\r\n\r\n"):
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(request)
                answer = b""
                with trio.fail_after(TIMEOUT):
                    while chunk := await stream.receive_some():
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 4"), answer[:80]
        await exchange(alice, bob)


async def wait_ready(http: httpx.AsyncClient, status: int) -> dict[str, Any]:
    """Poll ``/readyz`` until it answers ``status``; its body."""
    with trio.fail_after(30):
        while True:
            answer = await http.get("/readyz")
            if answer.status_code == status:
                body: dict[str, Any] = answer.json()
                return body
            await trio.sleep(0.05)


async def test_readyz_follows_nats(tmp_path: Path, engine: str) -> None:
    if engine != "nats":
        pytest.skip("NATS only; the embedded engine: the replica test")
    with nats_server(tmp_path / "nats") as server:
        config = load_config(data_dir=tmp_path / "data", port=0, http_listen="127.0.0.1:0",
                             nats=[server.url])
        async with trio.open_nursery() as nursery:
            node = await nursery.start(Node(config).run)
            assert node.http is not None
            async with httpx.AsyncClient(base_url=node.http.url, timeout=TIMEOUT) as http:
                await wait_ready(http, 200)
                await trio.to_thread.run_sync(server.kill)
                body = await wait_ready(http, 503)
                assert (body["check"], body["reason"]) == ("nats", "not connected to NATS")
                assert (await http.get("/healthz")).status_code == 200
                await trio.to_thread.run_sync(server.start)  # same port, same store
                assert await wait_ready(http, 200) == {"status": "ready"}
            node.request_shutdown()


async def test_slow_http_request_is_closed_after_the_idle_timeout(
        make_node: MakeNode, engine: str, clock: trio.testing.MockClock) -> None:
    """A request head that never ends is closed KEEP_ALIVE_TIMEOUT after the connection
    opened (hypercorn counts the connection idle until a head is complete), on trio's
    virtual clock; the node's chat goes on."""
    if engine != "embedded":
        pytest.skip("the HTTP front does not depend on the engine")
    node = await make_node(store="memory")
    host, port = http_url(node).removeprefix("http://").rsplit(":", 1)
    async with login(node, "alice") as alice, login(node, "bob") as bob:
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            start = trio.current_time()
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never ends
            with trio.fail_after(READ_TIMEOUT + TIMEOUT):
                while await stream.receive_some():
                    pass
            assert KEEP_ALIVE_TIMEOUT <= trio.current_time() - start <= READ_TIMEOUT
        await exchange(alice, bob)


async def test_http_port_in_use_is_one_line_and_exit_1(tmp_path: Path, engine: str) -> None:
    if engine != "embedded":
        pytest.skip("the HTTP front does not depend on the engine")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        status, _, err = await run(["serve", "--port", "0", "--data-dir", str(tmp_path),
                                    "--http-listen", listen])
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("chatd: error:")]
    assert errors == [f"chatd: error: cannot serve HTTP on {listen}: Address already in use "
                      '(set http_listen, or "" for none)'], err


async def test_shipped_rules_and_dashboard_use_only_metrics_the_node_exports(
        chat_node: RunningNode, engine: str) -> None:
    """docs/monitoring's Prometheus rules and Grafana dashboard load as they are (YAML and
    JSON of the documented shapes) and name only metrics a node exports (those of the other
    engine aside: the durable store's journal, NATS's publishes)."""
    docs = Path(__file__).parent.parent / "docs" / "monitoring"
    rules = yaml.safe_load((docs / "prometheus-rules.yml").read_text())
    exprs = []
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("page", "ticket")
            exprs.append(rule["expr"])
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    assert dashboard["panels"] and dashboard["title"] == "chatd"
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        text = (await http.get(f"{http_url(chat_node)}/metrics")).text
    exported = {family.name for family in text_string_to_metric_families(text)}
    used = {re.sub(r"_(bucket|count|sum|total)$", "", name)
            for expr in exprs for name in re.findall(r"\b(?:chatd|process)_[a-z_]+", expr)}
    other = "chatd_nats_" if engine == "embedded" else "chatd_store_"
    assert used and not {name for name in used - exported if not name.startswith(other)}, (
        used - exported)
    assert {name for name in used if name.startswith(other)}  # checked on the other engine


async def test_chatd_status_summarizes_a_node(make_node: MakeNode, engine: str) -> None:
    if engine != "embedded":
        pytest.skip("chatd status reads /metrics, which does not depend on the engine")
    node = await make_node(slo_interval=0.1, store="memory")
    async with login(node, "alice") as alice, login(node, "bob") as bob:
        for n in range(3):
            await alice.client.send("bob", f"hello {n}")
        await bob.msgs(3)
        with trio.fail_after(TIMEOUT):
            while not (await scrape(node)).get(("chatd_sends_recent_per_second", ())):
                await trio.sleep(0.05)
        status, out, err = await run(["status", http_url(node)])
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"chatd at {http_url(node)}: ready"
    assert lines[1].split()[:2] == ["sessions", "2"]
    assert "sent 3," in out
    assert re.search(r"^queue backlog +3 items, 0\.0 MiB$", out, re.MULTILINE), out  # not acked
    assert re.search(r"^replicas +readable$", out, re.MULTILINE), out
    # How fast those sends were depends on the machine: the figures' form, not their values.
    latency = r"(<= [0-9.]+ ms|over 1 s)"
    assert re.search(rf"send latency, 1 min +p99 {latency}, p99\.99 {latency}", out), out
    assert re.search(r"SLO alarms +(none|send_latency (page|ticket)(, send_latency ticket)?)$",
                     out, re.MULTILINE), out


async def test_chatd_status_of_nothing_is_one_line_and_exit_1(engine: str) -> None:
    if engine != "embedded":
        pytest.skip("no node involved")
    with refusing_url() as url:
        http = url.replace("ws://", "http://")
        status, out, err = await run(["status", http])
    assert (status, out) == (1, "")
    assert err.startswith(f"chatd: error: cannot read {http}/metrics: ") and (
        "refused" in err), err
    assert len(err.splitlines()) == 1


async def test_store_metrics_follow_the_journal(chat_node: RunningNode, engine: str) -> None:
    if engine != "embedded":
        pytest.skip("the durable store's journal is the embedded engine's")
    before = await scrape(chat_node)
    async with login(chat_node, "alice") as alice:
        for n in range(3):
            await alice.client.send("bob", f"stored {n}")  # one batch each: awaited in turn
    after = await scrape(chat_node)
    batches = delta(before, after, "chatd_store_batches_total")
    assert batches >= 3
    assert delta(before, after, "chatd_store_records_total") >= 3
    assert delta(before, after, "chatd_store_fsyncs_total") == 2 * batches  # two replicas
    assert delta(before, after, "chatd_store_commit_seconds_count") == batches
    assert delta(before, after, "chatd_store_commit_seconds_bucket", le="+Inf") == batches
