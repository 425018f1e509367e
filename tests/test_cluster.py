"""Cluster links between real ``chatd serve`` processes: membership and failure detection.

Two nodes configured as peers link over TCP, prove they share the cluster's secret, and
log ``peer_up``. A peer killed with SIGKILL is declared down at once (its kernel resets the
connection); a peer frozen with SIGSTOP, whose connection stays open but silent, is
declared down after ``failure_timeout``; either way the link comes back when the peer
does. A node holding another secret is refused.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from daemons import DEADLINE, Daemon, serve

from chatd.auth import mint_token
from chatd.cli import _config, _parser
from chatd.client import connect
from chatd.config import ConfigError, load_config

pytestmark = pytest.mark.slow

HEARTBEAT, FAILURE = 0.25, 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def node(tmp_path: Path, name: str, ports: dict[str, int], secret: str = "s3cret"
               ) -> AsyncIterator[Daemon]:
    """A node of the cluster ``ports`` (name -> cluster port), with fast heartbeats."""
    config = tmp_path / f"{name}.toml"
    config.write_text(f"heartbeat_interval = {HEARTBEAT}\nfailure_timeout = {FAILURE}\n")
    secret_file = tmp_path / f"{name}.secret"
    secret_file.write_text(secret + "\n")
    peers = [f"--peer={peer}=127.0.0.1:{port}" for peer, port in ports.items()
             if peer != name]
    async with serve(tmp_path / name, "--config", str(config), "--node", name,
                     "--secret-file", str(secret_file),
                     "--cluster-listen", f"127.0.0.1:{ports[name]}", *peers) as daemon:
        yield daemon


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


async def test_peers_link_and_a_sigkilled_peer_is_down_until_it_returns(
        tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    async with node(tmp_path, "n1", ports) as n1:
        async with node(tmp_path, "n2", ports) as n2:
            assert (await logged(n1, "peer_up"))["peer"] == "n2"
            assert (await logged(n2, "peer_up"))["peer"] == "n1"
            await n2.crash()
            down = await logged(n1, "peer_down")
            assert down["peer"] == "n2"
        async with node(tmp_path, "n2", ports) as n2_again:
            await logged(n1, "peer_up", count=2)
            await logged(n2_again, "peer_up")
        assert not n1.errors()


async def test_a_silent_peer_is_declared_down_after_failure_timeout(tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    async with node(tmp_path, "n1", ports) as n1, node(tmp_path, "n2", ports) as n2:
        await logged(n1, "peer_up")
        # On a loaded machine a 1 s failure_timeout may already have flapped the link:
        # what counts is the first peer_down after the freeze.
        ups, downs = len(n1.events("peer_up")), len(n1.events("peer_down"))
        n2.process.send_signal(signal.SIGSTOP)  # the link stays open but nothing comes
        try:
            frozen = trio.current_time()
            down = await logged(n1, "peer_down", count=downs + 1)
            elapsed = trio.current_time() - frozen
        finally:
            n2.process.send_signal(signal.SIGCONT)
        assert down["peer"] == "n2" and "nothing heard" in down["reason"]
        assert FAILURE - HEARTBEAT <= elapsed < FAILURE + 2.0
        await logged(n1, "peer_up", count=ups + 1)  # it comes back once n2 runs again


async def test_a_node_with_another_secret_is_refused(tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    async with (node(tmp_path, "n1", ports) as n1,
                node(tmp_path, "n2", ports, secret="another") as n2):
        # n1 dials (its name sorts first) and finds that n2 cannot prove the key.
        refused = await logged(n1, "link_refused")
        assert refused["peer"] == "n2" and "cluster's key" in refused["reason"]
        assert not n1.events("peer_up") and not n2.events("peer_up")


@pytest.mark.parametrize(("settings", "message"), [
    ({"peers": {"n2": "127.0.0.1:7800"}}, "needs cluster_listen"),
    ({"cluster_listen": "nowhere"}, "must be HOST:PORT"),
    ({"cluster_listen": "127.0.0.1:7800", "peers": {"n2": "127.0.0.1"}}, "must be HOST:PORT"),
    ({"cluster_listen": "127.0.0.1:7800", "peers": {"node1": "127.0.0.1:7801"}},
     "this node's own name"),
    ({"heartbeat_interval": 3.0, "failure_timeout": 3.0}, "shorter than failure_timeout"),
])
def test_cluster_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**settings)


def test_peer_option_must_name_the_peer() -> None:
    args = _parser().parse_args(["serve", "--cluster-listen", "127.0.0.1:7800",
                                 "--peer", "127.0.0.1:7801"])
    with pytest.raises(ConfigError, match="NAME=HOST:PORT"):
        _config(args)


async def test_a_login_on_another_node_takes_over_and_a_dead_nodes_users_are_forgotten(
        tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    async with node(tmp_path, "n1", ports) as n1, node(tmp_path, "n2", ports) as n2:
        await logged(n1, "peer_up")
        await logged(n2, "peer_up")
        with trio.fail_after(DEADLINE):
            token = mint_token(b"s3cret", "alice", 3600)  # one secret, every node
            async with (connect(n1.url, token) as first,
                        connect(n2.url, token)):  # logs in after the first
                async for _ in first.events():
                    pass  # ends when n1 closes the first session
                assert first.closed is not None
                assert (first.closed.code, first.closed.reason) == (4409, "session_replaced")
                replaced = await logged(n1, "session_replaced")
                assert replaced["user"] == "alice" and "@n2#" in replaced["new"]
                await n2.crash()
        forgotten = await logged(n1, "peer_sessions_forgotten")
        assert (forgotten["peer"], forgotten["sessions"]) == ("n2", 1)
