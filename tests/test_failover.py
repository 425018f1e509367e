"""Client failover against real ``chatd serve`` processes killed with SIGKILL, or stopped
with SIGTERM.

The client library (and the CLI on top of it) is given several URLs, or one URL with
failover on; when its connection is lost it connects again with jittered exponential
backoff, resumes from its last acknowledged sequence number, and sends again the messages
still waiting for ``sent`` with the same ids. These tests kill the node under the clients
and restart it on the same port and data directory, and check that nothing is lost or
handed to the application twice. A node stopped gracefully (SIGTERM, the documented way to
restart one) closes its sessions with ``shutting_down``: its clients fail over to another
node of the same NATS deployment as if the connection had been lost.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, first_line, refusing_url, run, serve
from natsservers import NatsServer

from chatd.auth import load_or_create_secret, mint_token
from chatd.client import Backoff, Client, Failure, connect
from chatd.protocol import Msg

pytestmark = pytest.mark.slow

FAST = Backoff(initial=0.05, maximum=0.5)


def port_of(server: Daemon) -> str:
    return server.url.rsplit(":", 1)[1]


async def receive(client: Client, count: int, got: list[Msg], done: trio.Event) -> None:
    """Collect ``count`` messages, acknowledging each, then set ``done``."""
    async for event in client.events():
        if isinstance(event, Msg):
            got.append(event)
            await client.ack(event.seq)
            if len(got) == count:
                done.set()
                return


async def test_clients_fail_over_across_a_sigkill_and_lose_nothing(tmp_path: Path) -> None:
    total, kill_after = 120, 40
    ids = [f"m{i}" for i in range(total)]
    got: list[Msg] = []
    all_received = trio.Event()
    async with serve(tmp_path) as first:
        url, port = first.url, port_of(first)
        alice_token, bob_token = first.token("alice"), first.token("bob")
        async with (connect([url], alice_token, reconnect=True, backoff=FAST) as alice,
                    connect([url], bob_token, reconnect=True, backoff=FAST) as bob,
                    trio.open_nursery() as nursery):
            nursery.start_soon(receive, bob, total, got, all_received)
            sent = []
            with trio.fail_after(DEADLINE):
                for msg_id in ids[:kill_after]:
                    sent.append(await alice.send("bob", f"body {msg_id}", id=msg_id))
                await first.crash()

                async def restart(task_status: trio.TaskStatus[Daemon]) -> None:
                    async with serve(tmp_path, "--port", port) as second:
                        task_status.started(second)
                        await trio.sleep_forever()

                # Sends made while the node is down wait for the next connection.
                results: dict[str, bool] = {}
                rest_sent = trio.Event()

                async def send_rest() -> None:
                    for msg_id in ids[kill_after:]:
                        results[msg_id] = (await alice.send("bob", f"body {msg_id}",
                                                            id=msg_id)).dup
                    rest_sent.set()

                nursery.start_soon(send_rest)
                second = await nursery.start(restart)
                await all_received.wait()
                await rest_sent.wait()
            assert [m.id for m in got] == ids  # every message once, in order
            assert [m.body for m in got] == [f"body {i}" for i in ids]
            assert not any(s.dup for s in sent)
            assert alice.reconnects >= 1 and bob.reconnects >= 1
            assert alice.closed is None and bob.closed is None  # still in service
            assert alice.url == bob.url == second.url
            nursery.cancel_scope.cancel()


async def test_client_tries_each_url_in_turn(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        with refusing_url() as dead, trio.fail_after(DEADLINE):
            async with connect([dead, server.url], server.token("alice"),
                               backoff=FAST) as alice:
                assert alice.url == server.url
                assert (await alice.send("bob", "hi")).dup is False


async def test_cli_listen_fails_over_across_a_sigkill(tmp_path: Path) -> None:
    async with serve(tmp_path) as first:
        url, port = first.url, port_of(first)
        alice, bob = first.token("alice"), first.token("bob")
        status, _, err = await run(["send", "--url", url, "--token", alice, "--to", "bob",
                                    "before"])
        assert status == 0, err
        with refusing_url() as dead:
            listen = await trio.lowlevel.open_process(
                [*CHATD, "listen", "--url", dead, "--url", url, "--token", bob,
                 "--count", "2", "--timeout", str(DEADLINE)],
                stdout=-1, stderr=-1)
            assert listen.stdout is not None
            assert b'"body":"before"' in await first_line(listen.stdout)
            await first.crash()
            async with serve(tmp_path, "--port", port) as second:
                status, _, err = await run(["send", "--url", second.url, "--token", alice,
                                            "--to", "bob", "after"])
                assert status == 0, err
                rest, status = await rest_of(listen)
                assert status == 0
            assert b'"body":"after"' in rest and b'"body":"before"' not in rest


async def rest_of(process: trio.Process) -> tuple[bytes, int]:
    """Everything ``process`` still writes on stdout, and its exit status (with a deadline)."""
    assert process.stdout is not None
    rest = b""
    with trio.fail_after(DEADLINE):
        async for chunk in process.stdout:
            rest += chunk
        return rest, await process.wait()


# -- a node stopped gracefully -----------------------------------------------------------------


@asynccontextmanager
async def two_nodes(tmp_path: Path, nats: NatsServer
                    ) -> AsyncIterator[tuple[Daemon, Daemon, Callable[[str], str]]]:
    """Nodes n1 and n2 on one NATS deployment (one secret, a namespace of their own), and a
    function minting a token for a user."""
    secret_file = tmp_path / "secret"
    secret = load_or_create_secret(secret_file)
    config = tmp_path / "chatd.toml"
    config.write_text(f'nats_namespace = "failover{uuid.uuid4().hex[:12]}"\n'
                      "shutdown_timeout = 2\n")
    common = ["--secret-file", str(secret_file), "--config", str(config),
              "--nats", nats.url]
    async with (serve(tmp_path / "n1", "--node", "n1", *common) as n1,
                serve(tmp_path / "n2", "--node", "n2", *common) as n2):
        yield n1, n2, lambda user: mint_token(secret, user, 3600.0)


async def stop(daemon: Daemon) -> None:
    """SIGTERM: the graceful stop; the daemon exits 0."""
    daemon.process.send_signal(signal.SIGTERM)
    with trio.fail_after(DEADLINE):
        assert await daemon.process.wait() == 0


async def test_cli_listen_fails_over_when_its_node_stops_gracefully(
        tmp_path: Path, shared_nats: NatsServer) -> None:
    """`chatd listen --url N1 --url N2` goes on across a SIGTERM of N1, and prints what
    comes afterwards through N2."""
    async with two_nodes(tmp_path, shared_nats) as (n1, n2, token):
        alice, bob = token("alice"), token("bob")
        status, _, err = await run(["send", "--url", n1.url, "--token", alice, "--to", "bob",
                                    "before"])
        assert status == 0, err
        listen = await trio.lowlevel.open_process(
            [*CHATD, "listen", "--url", n1.url, "--url", n2.url, "--token", bob,
             "--count", "2", "--timeout", str(DEADLINE)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert listen.stdout is not None and listen.stderr is not None
            assert b'"body":"before"' in await first_line(listen.stdout)
            await stop(n1)
            status, _, err = await run(["send", "--url", n2.url, "--token", alice,
                                        "--to", "bob", "after"])
            assert status == 0, err
            rest, status = await rest_of(listen)
            assert status == 0, (await listen.stderr.receive_some()).decode()
            assert b'"body":"after"' in rest and b'"body":"before"' not in rest
        finally:
            if listen.poll() is None:
                listen.kill()
            await listen.wait()


async def test_client_fails_over_when_its_node_stops_gracefully(
        tmp_path: Path, shared_nats: NatsServer) -> None:
    """The library treats the `shutting_down` error and close (1001) of a node that stops
    like a lost connection: it connects to the next URL, and the application sees no error,
    only what comes next."""
    retries: list[Failure] = []
    async with two_nodes(tmp_path, shared_nats) as (n1, n2, token):
        with trio.fail_after(DEADLINE):
            async with connect([n1.url, n2.url], token("bob"), backoff=FAST,
                               on_retry=retries.append) as bob:
                assert bob.url == n1.url
                await stop(n1)
                async with connect(n2.url, token("alice")) as alice:
                    await alice.send("bob", "after", id="after")
                events = []
                async for event in bob.events():
                    events.append(event)
                    if isinstance(event, Msg):
                        break
                assert [type(event) for event in events] == [Msg], events
                assert events[0].id == "after"
                assert (bob.url, bob.reconnects, bob.closed) == (n2.url, 1, None)
    assert retries == [Failure(n1.url, "shutting_down: the server is shutting down", lost=True)]
