"""The command line against real ``chatd serve`` processes.

These tests run the daemon and the client commands as subprocesses, exactly as a user
would from two terminals, and check their output and exit statuses.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
from daemons import CHATD, DEADLINE, Daemon, refusing_url, run, serve


def run_sync(args: list[str], **kwargs: Any) -> Any:
    import subprocess

    return subprocess.run([*CHATD, *args], capture_output=True, text=True, timeout=DEADLINE,
                          **kwargs)


def token(server: Daemon, user: str) -> str:
    """A token minted by `chatd token` itself, with the daemon's data directory."""
    result = run_sync(["token", user, "--data-dir", str(server.data_dir)])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def daemon(tmp_path: Path, *args: str, cwd: Path | None = None
           ) -> AbstractAsyncContextManager[Daemon]:
    """`chatd serve` on a free port; SIGTERM at the end, which must exit 0."""
    return serve(tmp_path / "data", *args, cwd=cwd, graceful=True)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_send_and_listen_show_sent_delivered_read(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        alice, bob = token(server, "alice"), token(server, "bob")
        listen: list[tuple[int, str, str]] = []

        async def listen_as_bob() -> None:
            listen.append(await run(["listen", "--url", server.url, "--token", bob, "--read",
                                     "--count", "1"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen_as_bob)
            status, out, err = await run(["send", "--url", server.url, "--token", alice,
                                          "--to", "bob", "--wait", "read", "hello"])
        assert status == 0, err
        receipts = json_lines(out)
        assert [r["type"] for r in receipts] == ["sent", "delivered", "read"]
        assert len({r["id"] for r in receipts}) == 1
        (listen_status, listen_out, listen_err), = listen
        assert listen_status == 0, listen_err
        (message,) = json_lines(listen_out)
        assert message["type"] == "msg" and message["from"] == "alice"
        assert message["body"] == "hello" and message["id"] == receipts[0]["id"]
        assert set(message) == {"type", "id", "from", "body", "seq", "ts"}


async def test_offline_user_gets_piped_lines_once_in_order(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(50)]
    async with daemon(tmp_path) as server:
        alice, carol = token(server, "alice"), token(server, "carol")
        status, out, err = await run(["send", "--url", server.url, "--token", alice,
                                      "--to", "carol", "-"],
                                     stdin="\n".join(lines).encode() + b"\n")
        assert status == 0, err
        assert [r["type"] for r in json_lines(out)] == ["sent"] * len(lines)
        status, out, err = await run(["listen", "--url", server.url, "--token", carol,
                                      "--count", str(len(lines))])
        assert status == 0, err
        assert [m["body"] for m in json_lines(out)] == lines
        # Acknowledged: a second listen finds nothing and times out.
        status, out, err = await run(["listen", "--url", server.url, "--token", carol,
                                      "--count", "1", "--timeout", "1"])
        assert (status, out) == (1, "")
        assert err.startswith("chatd: error: timed out")


async def test_lastseen_prints_presence(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        alice = token(server, "alice")
        status, out, err = await run(["lastseen", "--url", server.url, "--token", alice,
                                      "dave"])
        assert status == 0, err
        assert json.loads(out) == {"user": "dave", "online": False, "last_seen": None}
        status, out, err = await run(["lastseen", "--url", server.url, "--token", alice,
                                      "alice"])
        assert status == 0, err
        assert json.loads(out)["online"] is True


@pytest.mark.parametrize(("args", "expected"), [
    (["--url", "{server}", "--token", "not-a-token"], "chatd: error: refused: auth_failed"),
    (["--url", "{refusing}", "--token", "x"], "chatd: error: cannot connect"),
])
async def test_client_failures_exit_1_with_one_line(tmp_path: Path, args: list[str],
                                                    expected: str) -> None:
    async with daemon(tmp_path) as server:
        with refusing_url() as refusing:
            argv = ["send", "--to", "bob", *[a.replace("{server}", server.url)
                                             .replace("{refusing}", refusing) for a in args],
                    "hi"]
            status, out, err = await run(argv)
    assert status == 1 and out == ""
    assert err.startswith(expected) and err.count("\n") == 1


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env_without_token = {k: v for k, v in os.environ.items() if k != "CHATD_TOKEN"}
    result = run_sync(["send", "--to", "bob", "hi"], env=env_without_token)
    assert result.returncode == 2 and "token" in result.stderr
    config = tmp_path / "bad.toml"
    config.write_text("prot = 1\n")
    result = run_sync(["serve", "--config", str(config)])
    assert result.returncode == 2
    assert result.stderr == "chatd: error: unknown setting 'prot'\n"
    result = run_sync(["token", "two words"])
    assert result.returncode == 2


async def test_serve_runs_on_embedded_defaults(tmp_path: Path) -> None:
    async with daemon(tmp_path, cwd=tmp_path) as server:
        assert server.url.startswith("ws://127.0.0.1:")
        secret = tmp_path / "chatd-data" / "secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        (record,) = server.events("listening")
        assert {"@timestamp", "log.level", "event.action", "event.code", "service.node.name",
                "chatd.component"} <= set(record)


async def test_port_in_use_exits_1(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        result = run_sync(["serve", "--port", port, "--data-dir", str(tmp_path / "other")])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("chatd: error: cannot serve on")


async def test_sigterm_closes_sessions_with_1001_and_exits_0(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        bob = token(server, "bob")
        async with trio.open_nursery() as nursery:
            results: list[tuple[int, str, str]] = []

            async def listen() -> None:
                results.append(await run(["listen", "--url", server.url, "--token", bob]))

            nursery.start_soon(listen)
            alice = token(server, "alice")
            with trio.fail_after(DEADLINE):
                # Wait until bob's session exists: lastseen says he is online.
                while True:
                    _, out, _ = await run(["lastseen", "--url", server.url, "--token", alice,
                                           "bob"])
                    if json.loads(out)["online"]:
                        break
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(DEADLINE):
                assert await server.process.wait() == 0
        (status, _, err), = results
        assert status == 1
        assert "shutting_down" in err
        assert server.events("shutting_down") and server.events("stopped")


async def test_send_leaves_messages_for_the_sender_queued(tmp_path: Path) -> None:
    """`chatd send` consumes its receipts but never acknowledges away a message to it."""
    async with daemon(tmp_path) as server:
        alice, bob = token(server, "alice"), token(server, "bob")
        status, _, err = await run(["send", "--url", server.url, "--token", bob,
                                    "--to", "alice", "for alice"])
        assert status == 0, err

        async def bob_reads() -> None:
            await run(["listen", "--url", server.url, "--token", bob, "--read", "--count",
                       "1"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_reads)
            status, _, err = await run(["send", "--url", server.url, "--token", alice,
                                        "--to", "bob", "--wait", "read", "for bob"])
        assert status == 0, err
        status, out, err = await run(["listen", "--url", server.url, "--token", alice,
                                      "--count", "1", "--timeout", "5"])
        assert status == 0, err
        assert json_lines(out)[0]["body"] == "for alice"


async def test_send_stdin_edge_cases(tmp_path: Path) -> None:
    async with daemon(tmp_path) as server:
        alice = token(server, "alice")
        base = ["send", "--url", server.url, "--token", alice, "--to", "bob"]
        assert await run([*base, "-"], stdin=b"") == (0, "", "")
        status, _, err = await run([*base, "--id", "m1", "-"], stdin=b"a\nb\n")
        assert (status, err) == (2, "chatd: error: --id names a single message, and stdin "
                                    "holds 2 lines\n")
        status, out, err = await run([*base, "--id", "m1", "-"], stdin=b"just one\n")
        assert status == 0, err
        assert json_lines(out)[0]["id"] == "m1"


def test_a_data_directory_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    """The second example of status 1 in operations.md, word for word."""
    (tmp_path / "chatd-data").write_text("")
    result = run_sync(["serve", "--port", "0"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["chatd: error: cannot use chatd-data: File exists"]


def test_empty_secret_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("")
    result = run_sync(["serve", "--port", "0", "--data-dir", str(tmp_path)])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"chatd: error: secret file {tmp_path}/secret "
                                          "is empty"]


@pytest.mark.parametrize("limits", [
    "max_frames = 0", "max_depth = 2", "max_items = 100", "max_frame_bytes = 16384",
])
def test_unworkable_limits_are_refused(tmp_path: Path, limits: str) -> None:
    config = tmp_path / "chatd.toml"
    config.write_text(f"[limits]\n{limits}\n")
    result = run_sync(["serve", "--config", str(config)])
    assert result.returncode == 2
    assert result.stderr.startswith("chatd: error: limits.")


# -- nats-config -----------------------------------------------------------------------------


def nats_server_accepts(config_file: Path) -> None:
    """nats-server itself checks the configuration (``-t``: test it and exit)."""
    import subprocess

    from chatd.backends.nats.server import server_binary

    binary = server_binary()
    assert binary is not None
    result = subprocess.run([str(binary), "-t", "-c", str(config_file)], capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr


def test_nats_config_prints_a_server_that_fsyncs_every_write(tmp_path: Path) -> None:
    result = run_sync(["nats-config", "--store-dir", str(tmp_path / "js"), "--port", "4300"])
    assert result.returncode == 0, result.stderr
    assert "sync_interval: always" in result.stdout
    assert 'listen: "127.0.0.1:4300"' in result.stdout
    assert f'store_dir: "{tmp_path / "js"}"' in result.stdout
    assert "cluster" not in result.stdout
    (tmp_path / "nats.conf").write_text(result.stdout)
    nats_server_accepts(tmp_path / "nats.conf")


def test_nats_config_cluster_writes_three_servers_of_one_cluster(tmp_path: Path) -> None:
    out = tmp_path / "conf"
    result = run_sync(["nats-config", "--cluster", "--out", str(out),
                       "--store-dir", str(tmp_path / "js")])
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    assert result.stdout.splitlines() == [f"nats-server -c {f}" for f in files]
    texts = [f.read_text() for f in files]
    routes = ('routes: ["nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223", '
              '"nats-route://127.0.0.1:6224"]')
    for index, (file, text) in enumerate(zip(files, texts, strict=True)):
        assert "sync_interval: always" in text and routes in text
        assert f'listen: "127.0.0.1:{4222 + index}"' in text
        assert f'store_dir: "{tmp_path / "js" / f"nats-{index + 1}"}"' in text
        nats_server_accepts(file)


def test_nats_config_cluster_on_three_hosts(tmp_path: Path) -> None:
    result = run_sync(["nats-config", "--cluster", "--host", "10.0.0.1", "--host", "10.0.0.2",
                       "--host", "10.0.0.3", "--store-dir", "/var/lib/nats"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('listen: "10.0.0.2:4222"') == 1
    assert result.stdout.count('store_dir: "/var/lib/nats"') == 3
    assert result.stdout.count("nats-route://10.0.0.3:6222") == 3


@pytest.mark.parametrize("args", [["--cluster", "--host", "a", "--host", "b"],
                                  ["--host", "a", "--host", "b"]])
def test_nats_config_with_two_hosts_exits_2(args: list[str]) -> None:
    result = run_sync(["nats-config", *args])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("chatd: error: ")
