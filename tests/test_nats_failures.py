"""Acceptance tests of the NATS backend when NATS fails, with real processes: one
nats-server (where a server is needed) and ``chatd serve --nats URL``.

NATS unreachable or refusing the credentials at start is a one-line error and exit
status 1. Lost while the node runs, it makes sends fail with ``store_unavailable`` without
closing anything, and once it is back the node carries on by itself; nothing answered
``sent`` is lost, and no session waits for an answer forever.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, action, serve
from natsservers import NatsServer, nats_server
from test_nats_cluster import (
    RECOVERY,
    check_stored_once,
    drain_raw,
    send_retrying,
    toml,
)

from chatd.client import ChatError, Client, connect
from chatd.listener import unused_port
from chatd.protocol import Error, Msg, Sent

pytestmark = pytest.mark.slow

#: chatd's nats_timeout in these tests (seconds).
NATS_TIMEOUT = 2


def settings(directory: Path, **values: object) -> Path:
    """A TOML file of chatd settings with small timeouts, plus ``values``."""
    path = directory / "chatd.toml"
    path.write_text(toml({"nats_timeout": NATS_TIMEOUT, "shutdown_timeout": 2, **values}))
    return path


def node(directory: Path, nats: NatsServer, config: Path
         ) -> AbstractAsyncContextManager[Daemon]:
    """``chatd serve --nats`` on ``nats``, its data in ``directory/chatd``."""
    return serve(directory / "chatd", "--nats", nats.url, "--config", str(config))


async def refused_start(args: Sequence[str]) -> tuple[int, list[str], list[dict[str, object]],
                                                      float, int]:
    """Run ``chatd serve ARGS`` on a port it should never listen on, trying that port
    until the process exits; (status, stderr lines that are not JSON, JSON records,
    seconds it took, connections the port accepted)."""
    port = unused_port()
    started = trio.current_time()
    process = await trio.lowlevel.open_process(
        [*CHATD, "serve", "--port", str(port), *args], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    accepted = 0
    stderr = b""
    try:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                nonlocal stderr
                assert process.stderr is not None
                async for chunk in process.stderr:
                    stderr += chunk

            nursery.start_soon(read)
            with trio.fail_after(NATS_TIMEOUT + DEADLINE):
                while process.poll() is None:
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        pass
                    else:
                        accepted += 1
                        await stream.aclose()
                    await trio.sleep(0.05)
                status = await process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    took = trio.current_time() - started
    plain, records = [], []
    for line in stderr.decode().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            plain.append(line)
    return status, plain, records, took, accepted


# -- 6. NATS unreachable at start ------------------------------------------------------------


async def test_unreachable_nats_at_start_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{unused_port()}"
    status, plain, records, took, accepted = await refused_start(
        ["--data-dir", str(tmp_path / "data"), "--nats", url,
         "--config", str(settings(tmp_path))])
    assert status == 1
    errors = [line for line in plain if line.startswith("chatd: error:")]
    assert len(errors) == 1 and errors == plain, plain
    assert url in errors[0], errors[0]
    print(f"exited {status} after {took:.1f} s: {errors[0]}")
    assert took < NATS_TIMEOUT + 5, f"took {took:.1f} s"
    assert accepted == 0 and not [r for r in records if action(r) == "listening"]


# -- 7. wrong credentials ----------------------------------------------------------------------


async def test_wrong_credentials_are_a_one_line_error_and_right_ones_serve(
        tmp_path: Path) -> None:
    authorization = 'authorization {\n  user: "u"\n  password: "p"\n}\n'
    with nats_server(tmp_path / "nats", extra=authorization) as server:
        (tmp_path / "wrong").mkdir()
        wrong = settings(tmp_path / "wrong", nats_user="u", nats_password="not-p")
        status, plain, records, took, accepted = await refused_start(
            ["--data-dir", str(tmp_path / "data"), "--nats", server.url,
             "--config", str(wrong)])
        assert status == 1
        assert len(plain) == 1 and plain[0].startswith("chatd: error:"), plain
        assert "credentials" in plain[0] and server.url in plain[0], plain[0]
        print(f"exited {status} after {took:.1f} s: {plain[0]}")
        assert took < NATS_TIMEOUT + 5, f"took {took:.1f} s"
        assert accepted == 0 and not [r for r in records if action(r) == "listening"]

        (tmp_path / "right").mkdir()
        right = settings(tmp_path / "right", nats_user="u", nats_password="p")
        async with node(tmp_path, server, right) as daemon:
            async with connect(daemon.url, daemon.token("alice")) as alice:
                with trio.fail_after(DEADLINE):
                    assert (await alice.send("bob", "hi")).dup is False
            assert not daemon.errors(), daemon.errors()


# -- 8. NATS lost while the node runs -----------------------------------------------------------


async def logged(daemon: Daemon, event: str) -> dict[str, object]:
    """Wait until ``daemon`` has logged ``event``; its record."""
    with trio.fail_after(DEADLINE):
        while not daemon.events(event):
            await trio.sleep(0.05)
    return daemon.events(event)[0]


async def wait_for(client: Client, msg_id: str) -> Msg:
    """Read ``client``'s events until the message ``msg_id``, acknowledging it."""
    with trio.fail_after(RECOVERY):
        async for event in client.events():
            if isinstance(event, Msg):
                await client.ack(event.seq)
                if event.id == msg_id:
                    return event
    raise AssertionError(f"the connection ended before {msg_id}: {client.closed}")


async def test_nats_lost_and_back_while_the_node_runs(tmp_path: Path) -> None:
    """The nats-server is SIGKILLed under a node with two sessions, then restarted on the
    same port and store: the sessions stay open meanwhile, and once the node has
    reconnected by itself a send is answered ``sent`` and delivered on the same
    connection; what was ``sent`` before the kill is all there."""
    before = [f"c{i}" for i in range(5)]
    with nats_server(tmp_path / "nats") as server:
        async with node(tmp_path, server, settings(tmp_path)) as daemon:
            async with (connect(daemon.url, daemon.token("alice")) as alice,
                        connect(daemon.url, daemon.token("bob")) as bob):
                with trio.fail_after(DEADLINE):
                    for msg_id in before:  # for carol, offline
                        await alice.send("carol", f"body of {msg_id}", id=msg_id)
                    await alice.send("bob", "before", id="b-before")
                await wait_for(bob, "b-before")

                server.kill()
                await logged(daemon, "nats_disconnected")
                # Not fatal: both sessions are open, on the same connections.
                with trio.fail_after(DEADLINE):
                    assert (await bob.last_seen("alice")).online
                assert alice.closed is None and bob.closed is None

                await trio.to_thread.run_sync(server.start)  # same port, same store
                back_at = trio.current_time()
                # (A send before the node has reconnected crashes the session: see the
                # next test.)
                await logged(daemon, "nats_reconnected")
                sent, failures = await send_retrying(alice, "bob", "b-after")
                print(f"sends worked again {trio.current_time() - back_at:.1f} s after the "
                      f"restart ({failures} store_unavailable before)")
                assert not sent.dup
                await wait_for(bob, "b-after")  # on the same connection
                assert alice.closed is None and bob.closed is None
                assert alice.reconnects == bob.reconnects == 0
                await send_retrying(alice, "carol", "probe")
            stored = await drain_raw(daemon.url, daemon.token("carol"), "probe")
            check_stored_once(stored, {*before, "probe"})
            assert daemon.events("nats_reconnected")
            assert not daemon.errors(), daemon.errors()


async def test_a_send_while_nats_is_down_is_refused_and_the_session_goes_on(
        tmp_path: Path) -> None:
    with nats_server(tmp_path / "nats") as server:
        async with (node(tmp_path, server, settings(tmp_path)) as daemon,
                    connect(daemon.url, daemon.token("alice")) as alice):
            with trio.fail_after(DEADLINE):
                await alice.send("bob", "before")
            server.kill()
            await logged(daemon, "nats_disconnected")
            with trio.fail_after(NATS_TIMEOUT + DEADLINE), pytest.raises(ChatError) as lost:
                await alice.send("bob", "lost")
            assert lost.value.code == "store_unavailable", lost.value
            assert alice.closed is None
            assert not daemon.events("session_crashed")


# -- 9. NATS restarted during a burst -------------------------------------------------------------


class Answers:
    """The ids answered ``sent``, and those answered ``store_unavailable``."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.refused: set[str] = set()
        self._changed = trio.Event()

    async def collect(self, client: Client) -> None:
        async for event in client.events():
            if isinstance(event, Sent):
                self.sent.add(event.id)
            elif isinstance(event, Error):
                assert event.code == "store_unavailable" and event.ref, event
                self.refused.add(event.ref)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, ids: Sequence[str]) -> None:
        while not set(ids) <= self.sent | self.refused:
            await self._changed.wait()


async def test_nats_restarted_mid_burst_hangs_no_session_and_loses_nothing(
        tmp_path: Path) -> None:
    """alice sends a burst, pipelined in runs of 20, and the nats-server is SIGKILLed and
    restarted once 100 are sent: every send is answered within a deadline, ``sent`` or
    ``store_unavailable``; then the refused ones are sent again with the same ids, and
    every message is stored once, those never refused in the order sent.

    alice's connection stays open throughout: a send that reaches the node while it has no
    NATS connection is refused like any other.
    """
    total, restart_after, chunk = 400, 100, 20
    ids = [f"m{i:03d}" for i in range(total)]
    with nats_server(tmp_path / "nats") as server:
        async with node(tmp_path, server, settings(tmp_path)) as daemon:
            answers = Answers()
            async with (connect(daemon.url, daemon.token("alice")) as alice,
                        trio.open_nursery() as nursery):
                nursery.start_soon(answers.collect, alice)

                async def restart() -> None:
                    server.kill()
                    await trio.to_thread.run_sync(server.start)  # same port, same store

                for start in range(0, total, chunk):
                    if start == restart_after:
                        nursery.start_soon(restart)
                    run = ids[start:start + chunk]
                    await alice.submit([(i, "bob", f"body of {i}") for i in run])
                    with trio.fail_after(NATS_TIMEOUT + DEADLINE):
                        await answers.wait_for(run)
                refused = answers.refused - answers.sent
                print(f"{len(answers.refused)} sends answered store_unavailable, "
                      f"{len(refused)} of them never sent")
                assert alice.closed is None
                for msg_id in sorted(refused):
                    await send_retrying(alice, "bob", msg_id)
                await send_retrying(alice, "bob", "probe")
                nursery.cancel_scope.cancel()
            stored = await drain_raw(daemon.url, daemon.token("bob"), "probe")
            check_stored_once(stored, {*ids, "probe"})
            kept = [m.id for m in stored if m.id not in answers.refused]
            assert kept == sorted(kept), "stored out of the order sent"
            assert not daemon.errors(), daemon.errors()


# -- pipelined sends NATS does not answer ------------------------------------------------


async def test_pipelined_sends_nats_does_not_answer_are_refused_within_nats_timeout(
        tmp_path: Path) -> None:
    timeout, count = 0.5, 30
    with nats_server(tmp_path / "nats") as server:
        config = settings(tmp_path, nats_timeout=timeout)
        async with (node(tmp_path, server, config) as daemon,
                    connect(daemon.url, daemon.token("alice")) as alice):
            with trio.fail_after(DEADLINE):
                await alice.send("bob", "hi")
            server.pause()  # connected, silent
            try:
                await alice.submit([(f"m{i}", "bob", "hi") for i in range(count)])
                answered = 0
                with trio.fail_after(timeout + 2.5):
                    async for event in alice.events():
                        assert isinstance(event, Error), event
                        assert event.code == "store_unavailable"
                        answered += 1
                        if answered == count:
                            break
            finally:
                server.resume()
