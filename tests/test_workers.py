"""``chatd serve --workers N`` against real processes: one port, several node processes.

The supervisor starts a local nats-server, then N workers, each a node on that NATS, all
listening on the same port with SO_REUSEPORT. These tests connect through that one port
and read which worker answered from the welcome's session id (``NODE.SERIAL``); they stop
the supervisor with SIGTERM and SIGKILL, kill workers and the nats-server, and check the
configuration of ``workers``.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, action, serve

from chatd.cli import parser
from chatd.cli._common import config_from_args
from chatd.cli._serve import passthrough
from chatd.client import Client, connect
from chatd.config import ConfigError, load_config
from chatd.listener import unused_port
from chatd.protocol import Msg, Receipt
from chatd.workers import plan_workers, worker_names

pytestmark = pytest.mark.slow

WORKERS = ("node1-w1", "node1-w2")
#: Connections opened to see both workers answer: all on one of two is 2 ** -39 likely.
CONNECTIONS = 40
#: Connections tried to land one user on a given worker (each lands there half the time).
ATTEMPTS = 40


def free_port() -> int:
    """A free port that no outgoing connection can take before a daemon binds it."""
    return unused_port()


@asynccontextmanager
async def workers(tmp_path: Path, *args: str, graceful: bool = True
                  ) -> AsyncIterator[Daemon]:
    """``chatd serve --workers 2`` until the block ends (SIGTERM, exit 0 if graceful)."""
    async with serve(tmp_path / "data", "--workers", "2", *args, graceful=graceful) as daemon:
        yield daemon


async def logged(daemon: Daemon, event: str, match: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Wait (with a deadline) until ``daemon`` has logged ``event`` with fields ``match``
    (by ECS name: a value, or a function of the field's value that says whether it
    matches)."""
    with trio.fail_after(DEADLINE):
        while True:
            for record in daemon.events(event):
                if all(value(record.get(key)) if callable(value) else record.get(key) == value
                       for key, value in (match or {}).items()):
                    return record
            await trio.sleep(0.02)


def worker_of(client: Client) -> str:
    """The node that serves ``client``: its welcome's session id is ``NODE.SERIAL``."""
    assert client.welcome is not None
    return client.welcome.session.rpartition(".")[0]


async def workers_seen(daemon: Daemon) -> collections.Counter[str]:
    """Open :data:`CONNECTIONS` connections at once; count them by the worker that answers."""
    seen: collections.Counter[str] = collections.Counter()
    with trio.fail_after(DEADLINE):
        async with AsyncExitStack() as stack:
            for index in range(CONNECTIONS):
                client = await stack.enter_async_context(
                    connect(daemon.url, daemon.token(f"user{index}")))
                seen[worker_of(client)] += 1
    return seen


async def connect_on(stack: AsyncExitStack, daemon: Daemon, user: str, worker: str
                     ) -> Client:
    """Connect as ``user`` until the connection lands on ``worker``; keep it in ``stack``."""
    for _ in range(ATTEMPTS):
        attempt = AsyncExitStack()
        client = await attempt.enter_async_context(connect(daemon.url, daemon.token(user)))
        if worker_of(client) == worker:
            stack.push_async_exit(attempt)
            return client
        await attempt.aclose()
    raise AssertionError(f"{ATTEMPTS} connections of {user} never landed on {worker}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an unreaped zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def gone(pids: list[int]) -> None:
    with trio.fail_after(DEADLINE):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.02)


async def test_both_workers_serve_through_one_port(tmp_path: Path) -> None:
    port = free_port()
    async with workers(tmp_path, "--port", str(port)) as daemon:
        assert daemon.url == f"ws://127.0.0.1:{port}"
        (listening,) = daemon.events("listening")
        assert (listening["service.node.name"], listening["chatd.component"],
                listening["chatd.workers"]) == (
            "node1", "workers", 2)
        # Only the supervisor says `listening`, and only once every worker serves.
        ready = {r["chatd.worker"] for r in daemon.records[:daemon.records.index(listening)]
                 if action(r) == "worker_ready"}
        assert ready == set(WORKERS)
        seen = await workers_seen(daemon)
        assert set(seen) == set(WORKERS), seen
        # The secret is shared; the local nats-server keeps its files in DATA_DIR/nats.
        assert {p.name for p in (tmp_path / "data").iterdir()} >= {"secret", "nats"}
        assert (tmp_path / "data" / "nats" / "jetstream").is_dir()
        assert not daemon.errors()


async def test_users_on_two_workers_chat(tmp_path: Path) -> None:
    async with workers(tmp_path) as daemon:
        with trio.fail_after(DEADLINE):
            async with AsyncExitStack() as stack:
                alice = await connect_on(stack, daemon, "alice", "node1-w1")
                bob = await connect_on(stack, daemon, "bob", "node1-w2")
                sent = await alice.send("bob", "hello from the other core")
                async for event in bob.events():
                    if isinstance(event, Msg):
                        assert (event.id, event.sender, event.body) == (
                            sent.id, "alice", "hello from the other core")
                        await bob.ack(event.seq)
                        break
                async for event in alice.events():
                    if (isinstance(event, Receipt) and event.status == "delivered"
                            and sent.id in event.ids):
                        assert event.by == "bob"
                        break


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_every_worker_and_exits_0(tmp_path: Path, signum: int) -> None:
    async with workers(tmp_path, graceful=False) as daemon:
        pids = [r["process.pid"] for r in daemon.events("worker_started")]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        with trio.fail_after(DEADLINE):
            async with connect(daemon.url, daemon.token("carol")) as carol:
                daemon.process.send_signal(signum)
                async for _ in carol.events():
                    pass  # ends when carol's worker closes her session
            assert carol.closed is not None
            assert (carol.closed.code, carol.closed.reason) == (1001, "shutting_down")
            assert await daemon.process.wait() == 0
        await logged(daemon, "stopped", {"chatd.component": "workers"})
        assert all(not alive(pid) for pid in pids)
        exited = {r["chatd.worker"]: r for r in daemon.events("worker_exited")}
        assert set(exited) == set(WORKERS)
        assert all(r["process.exit_code"] == 0 and r["log.level"] == "info"
                   for r in exited.values())
        assert not daemon.errors()


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
        tmp_path: Path) -> None:
    async with workers(tmp_path) as daemon:  # and SIGTERM at the end still exits 0
        (victim,) = [r for r in daemon.events("worker_started")
                     if r["chatd.worker"] == "node1-w2"]
        os.kill(victim["process.pid"], signal.SIGKILL)
        exited = await logged(daemon, "worker_exited", {"chatd.worker": "node1-w2"})
        assert (exited["process.exit_code"], exited["log.level"]) == (-signal.SIGKILL, "error")
        again = await logged(daemon, "worker_started",
                             {"chatd.worker": "node1-w2", "chatd.restarts": 1})
        assert again["process.pid"] != victim["process.pid"]
        await logged(daemon, "worker_ready", {"process.pid": again["process.pid"]})
        assert set(await workers_seen(daemon)) == set(WORKERS)
        assert daemon.process.poll() is None
        assert [action(r) for r in daemon.errors()] == ["worker_exited"]
        assert len(daemon.events("listening")) == 1


async def test_too_many_restarts_stop_everything_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "chatd.toml"
    config.write_text("restart_intensity = 1\nrestart_period = 60.0\n")
    async with workers(tmp_path, "--config", str(config), graceful=False) as daemon:
        pids = [r["process.pid"] for r in daemon.events("worker_started")]
        first = await logged(daemon, "worker_started",
                             {"chatd.worker": "node1-w1", "chatd.restarts": 0})
        os.kill(first["process.pid"], signal.SIGKILL)
        second = await logged(daemon, "worker_started",
                              {"chatd.worker": "node1-w1", "chatd.restarts": 1})
        pids.append(second["process.pid"])
        await logged(daemon, "worker_ready", {"process.pid": second["process.pid"]})
        os.kill(second["process.pid"], signal.SIGKILL)
        with trio.fail_after(DEADLINE):
            assert await daemon.process.wait() == 1
        await logged(daemon, "stopped", {"chatd.component": "workers"})
        exceeded = await logged(daemon, "restart_intensity_exceeded")
        assert (exceeded["chatd.worker"], exceeded["chatd.intensity"]) == ("node1-w1", 1)
        assert daemon.records[-1] == {
            "event.action": "not_json",
            "line": "chatd: error: workers restarted more than 1 times in 60.0 s "
                    "(the last: node1-w1, killed by SIGKILL)"}
        assert all(not alive(pid) for pid in pids)


async def test_a_worker_that_cannot_start_fails_the_whole(tmp_path: Path) -> None:
    config = tmp_path / "chatd.toml"
    config.write_text("nats_timeout = 1.0\n")
    nowhere = f"nats://127.0.0.1:{free_port()}"
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [*CHATD, "serve", "--workers", "2", "--port", "0", "--config", str(config),
             "--data-dir", str(tmp_path / "data"), "--nats", nowhere],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith("chatd: error: worker node1-w"), last
    assert f"failed to start: cannot reach NATS at {nowhere}" in last, last


async def test_a_nats_server_that_cannot_start_fails_the_whole(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "nats").write_text("not a directory")
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [*CHATD, "serve", "--workers", "2", "--port", "0", "--data-dir", str(data)],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith("chatd: error: cannot start nats-server"), last


def children(pid: int) -> list[int]:
    """The child processes of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


async def test_a_killed_nats_server_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    async with workers(tmp_path) as daemon:
        with trio.fail_after(DEADLINE * 3):
            async with AsyncExitStack() as stack:
                alice = await connect_on(stack, daemon, "alice", "node1-w1")
                before = [await alice.send("bob", f"before {i}") for i in range(20)]
                started = daemon.events("nats_started")[0]
                (server,) = children(started["process.pid"])  # the watchdog runs nats-server
                os.kill(server, signal.SIGKILL)
                await logged(daemon, "nats_exited", {"process.pid": started["process.pid"]})
                restarted = await logged(daemon, "nats_started", {
                    "process.pid": lambda pid: pid != started["process.pid"]})
                await logged(daemon, "nats_ready", {"process.pid": restarted["process.pid"]})
                # The workers reconnect by themselves, check their streams and buckets, and
                # serve again.
                for worker in WORKERS:
                    await logged(daemon, "bus_resync", {"service.node.name": worker})
                after = await alice.send("bob", "after")
                bob = await connect_on(stack, daemon, "bob", "node1-w2")
                got = []
                async for event in bob.events():
                    if isinstance(event, Msg):
                        got.append(event.id)
                        if event.id == after.id:
                            break
                assert got == [sent.id for sent in before] + [after.id]


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with workers(tmp_path, graceful=False) as daemon:
        pids = [r["process.pid"] for r in daemon.events("worker_started")]
        assert len(pids) == 2
        watchdog = daemon.events("nats_started")[0]["process.pid"]
        pids += [watchdog, *children(watchdog)]
        assert len(pids) == 4
        await daemon.crash()
        # Their stdin, a pipe from the supervisor, closes: each shuts down by itself, the
        # nats-server's watchdog with its server (gone() fails the test if one still runs
        # after the deadline).
        await gone(pids)


async def test_the_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(DEADLINE):
            result = await trio.run_process(
                [*CHATD, "serve", "--workers", "2", "--port", str(port),
                 "--data-dir", str(tmp_path / "data")],
                capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == (f"chatd: error: cannot serve on 127.0.0.1:{port}: "
                                      "Address already in use\n")


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 65])
def test_workers_must_be_1_to_64(value: int) -> None:
    with pytest.raises(ConfigError, match=f"workers must be 1-64, not {value}"):
        load_config(workers=value)


def test_workers_and_reuse_port_from_the_file_and_their_defaults(tmp_path: Path) -> None:
    assert (load_config().workers, load_config().reuse_port) == (1, False)
    config = tmp_path / "chatd.toml"
    config.write_text("workers = 64\nreuse_port = true\n")
    loaded = load_config(config)
    assert (loaded.workers, loaded.reuse_port) == (64, True)
    config.write_text('workers = "2"\n')
    with pytest.raises(ConfigError, match="'workers' must be int"):
        load_config(config)
    config.write_text("reuse_port = 1\n")
    with pytest.raises(ConfigError, match="'reuse_port' must be bool"):
        load_config(config)


async def test_workers_0_on_the_command_line_exits_2() -> None:
    with trio.fail_after(DEADLINE):
        result = await trio.run_process([*CHATD, "serve", "--workers", "0"],
                                         capture_stdout=True, capture_stderr=True,
                                         check=False)
    assert result.returncode == 2
    assert result.stderr.decode() == "chatd: error: workers must be 1-64, not 0\n"


def test_worker_names_keep_within_32_characters() -> None:
    names = worker_names(load_config(node="n" * 32, workers=12))
    assert len(set(names)) == 12 and all(len(name) <= 32 for name in names)
    assert names[0] == "n" * 29 + "-w1" and names[11] == "n" * 28 + "-w12"


def test_each_worker_gets_its_own_settings_and_the_options_given(tmp_path: Path) -> None:
    (tmp_path / "chatd.toml").write_text("")
    args = parser().parse_args([
        "serve", "--workers", "3", "--config", str(tmp_path / "chatd.toml"),
        "--log-level", "debug",
        "--node", "edge", "--data-dir", "/srv/chatd", "--port", "9000",
        "--nats-creds", "/etc/chatd/nats.creds"])
    config = config_from_args(args)
    options = passthrough(args)
    assert options == [f"--config={tmp_path / 'chatd.toml'}", "--log-level=debug",
                       "--nats-creds=/etc/chatd/nats.creds"]
    names = worker_names(config)
    specs = plan_workers(config, names, 9000, ["nats://127.0.0.1:4999"], options)
    assert [spec.name for spec in specs] == ["edge-w1", "edge-w2", "edge-w3"]
    argv = specs[1].argv
    assert argv[:4] == (argv[0], "-m", "chatd", "serve") and argv[4:7] == tuple(options)
    assert set(argv[7:]) == {
        "--workers=1", "--reuse-port", "--supervised", "--node=edge-w2",
        "--host=127.0.0.1", "--port=9000", "--data-dir=/srv/chatd/w2",
        "--secret-file=/srv/chatd/secret", "--nats=nats://127.0.0.1:4999",
        "--http-listen=127.0.0.1:8767"}  # worker N: the HTTP port + N - 1
    # What a worker's own command line makes of it.
    worker = config_from_args(parser().parse_args(list(argv[3:])))
    assert (worker.workers, worker.reuse_port, worker.node, worker.port, worker.nats,
            worker.http_listen) == (
        1, True, "edge-w2", 9000, ("nats://127.0.0.1:4999",), "127.0.0.1:8767")
