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
from chatd.listener import unused_port

pytestmark = pytest.mark.slow

HEARTBEAT, FAILURE = 0.25, 1.5


def free_port() -> int:
    """A free port that no outgoing connection can take before a daemon binds it."""
    return unused_port()


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


class LinkCutter:
    """A TCP relay on the link from n1 to n2 that can black-hole it: while ``cut``, bytes
    are read and dropped in both directions and the connections stay open, as in a
    network partition."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = False
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[LinkCutter]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._relay, listeners)
            task_status.started(self)

    async def _relay(self, inbound: trio.SocketStream) -> None:
        try:
            outbound = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            return
        async with outbound, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    while data := await src.receive_some():
                        if not self.cut:
                            await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                if not self.cut:  # in a partition, one side's close does not get across
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump, inbound, outbound)
            nursery.start_soon(pump, outbound, inbound)


async def test_a_link_cut_splits_the_cluster_and_healing_it_reconciles_logins(
        tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    token = mint_token(b"s3cret", "alice", 3600)
    async with trio.open_nursery() as nursery:
        cutter = await nursery.start(LinkCutter(ports["n2"]).run)
        # n1 dials n2 (its name sorts first) through the relay.
        n1_view = {"n1": ports["n1"], "n2": cutter.port}
        async with node(tmp_path, "n1", n1_view) as n1, node(tmp_path, "n2", ports) as n2:
            await logged(n1, "peer_up")
            await logged(n2, "peer_up")
            with trio.fail_after(DEADLINE):
                async with connect(n1.url, token) as on_n1:
                    # During the cut each side declares the other down within
                    # failure_timeout and forgets its sessions.
                    downs = {d: len(d.events("peer_down")) for d in (n1, n2)}
                    forgets = len(n2.events("peer_sessions_forgotten"))
                    ups = len(n1.events("peer_up"))
                    cutter.cut = True
                    down = await logged(n2, "peer_down", count=downs[n2] + 1)
                    assert "nothing heard" in down["reason"]
                    forgotten = await logged(n2, "peer_sessions_forgotten", count=forgets + 1)
                    assert (forgotten["peer"], forgotten["sessions"]) == ("n1", 1)
                    await logged(n1, "peer_down", count=downs[n1] + 1)
                    # Each side serves its own users: alice can log in on n2 as well,
                    # and her session on n1 goes on.
                    async with connect(n2.url, token) as on_n2:
                        assert (await on_n1.last_seen("alice")).online is True
                        assert on_n1.closed is None
                        # Healed, the link comes back and the later login wins everywhere.
                        cutter.cut = False
                        await logged(n1, "peer_up", count=ups + 1)
                        async for _ in on_n1.events():
                            pass
                        assert on_n1.closed is not None
                        assert on_n1.closed.code == 4409
                        assert (await on_n2.last_seen("alice")).online is True
        nursery.cancel_scope.cancel()


def test_unused_ports_lie_below_the_ephemeral_range_and_are_free() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    taken = frozenset({unused_port()})
    port = unused_port(exclude=taken)
    assert port < low and port not in taken
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nothing holds it
