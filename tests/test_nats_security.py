"""How chatd proves who it is to NATS and who NATS is: real nats-servers with TLS or
nkey users, and real ``chatd serve`` processes.

- TLS with a certificate from a private CA (made by trustme): chatd trusts the CA when
  ``nats_tls_ca`` names it, and serves; without it, or when the server does not require
  TLS although the URL says ``tls://``, it refuses to start with one line that says why.
- An nkey user (``nats_nkey``, a seed file): the server admits the node; a missing seed file
  is one line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import nkeys
import pytest
import trio
import trustme
from daemons import CHATD, DEADLINE, Daemon, serve
from natsservers import nats_server

from chatd.client import connect
from chatd.protocol import Msg

pytestmark = pytest.mark.slow


async def alice_reaches_bob(daemon: Daemon, body: str) -> None:
    """alice sends ``body`` to bob through ``daemon``, and bob gets it."""
    with trio.fail_after(DEADLINE):
        async with (connect(daemon.url, daemon.token("alice")) as alice,
                    connect(daemon.url, daemon.token("bob")) as bob):
            sent = await alice.send("bob", body)
            async for event in bob.events():
                assert isinstance(event, Msg) and event.id == sent.id
                break


def tls_block(tmp_path: Path) -> tuple[str, Path]:
    """A nats-server ``tls {}`` block with a certificate for 127.0.0.1, and the CA file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = (tmp_path / "server.pem", tmp_path / "server.key",
                                    tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return f'tls {{\n  cert_file: "{cert_file}"\n  key_file: "{key_file}"\n}}\n', ca_file


async def test_chatd_reaches_nats_over_tls_with_a_private_ca(tmp_path: Path) -> None:
    block, ca_file = tls_block(tmp_path)
    with nats_server(tmp_path, extra=block) as server:
        config = tmp_path / "chatd.toml"
        config.write_text(f'nats_tls_ca = "{ca_file}"\n')
        url = f"tls://127.0.0.1:{server.spec.port}"
        async with serve(tmp_path / "data", "--config", str(config), "--nats", url,
                         graceful=True) as daemon:
            connected = daemon.events("nats_connected")
            assert connected and connected[0]["url.full"] == url
            await alice_reaches_bob(daemon, "over TLS")


async def test_an_untrusted_nats_certificate_exits_1_with_one_line(tmp_path: Path) -> None:
    block, _ = tls_block(tmp_path)
    with nats_server(tmp_path, extra=block) as server:
        config = tmp_path / "chatd.toml"
        config.write_text("nats_timeout = 2.0\n")
        url = f"tls://127.0.0.1:{server.spec.port}"
        with trio.fail_after(DEADLINE):
            result = await trio.run_process(
                [*CHATD, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                 "--config", str(config), "--nats", url],
                capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    last = lines[-1]
    assert last.startswith(f"chatd: error: cannot reach NATS at {url} within 2 s: "), last
    assert "CERTIFICATE_VERIFY_FAILED" in last or "certificate verify failed" in last, last
    assert not [line for line in lines if line.startswith("Traceback")]


async def test_tls_url_to_a_server_without_tls_exits_1_with_one_line(tmp_path: Path) -> None:
    with nats_server(tmp_path) as server:
        url = f"tls://127.0.0.1:{server.spec.port}"
        with trio.fail_after(DEADLINE):
            result = await trio.run_process(
                [*CHATD, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                 "--nats", url], capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == (
        f"chatd: error: NATS at tls://127.0.0.1:{server.spec.port} does not require TLS, "
        "which the configuration asks for (tls:// or nats_tls_*)")


def nkey_user(tmp_path: Path) -> tuple[str, Path]:
    """A new nkey user: its public key, and a file holding its seed."""
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()),
                             nkeys.PREFIX_BYTE_USER)
    tmp_path.mkdir(parents=True, exist_ok=True)
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    return nkeys.from_seed(seed).public_key.decode(), seed_file


async def test_a_node_logs_in_to_nats_with_an_nkey(tmp_path: Path) -> None:
    public, seed_file = nkey_user(tmp_path)
    auth = f'authorization {{\n  users: [ {{ nkey: "{public}" }} ]\n}}\n'
    with nats_server(tmp_path, extra=auth) as server:
        config = tmp_path / "chatd.toml"
        config.write_text(f'nats_nkey = "{seed_file}"\n')
        async with serve(tmp_path / "data", "--config", str(config), "--nats", server.url,
                         graceful=True) as daemon:
            await alice_reaches_bob(daemon, "signed in with an nkey")
        # Another user's key is refused, in one line.
        other, other_seed = nkey_user(tmp_path / "other")
        config.write_text(f'nats_nkey = "{other_seed}"\nnats_timeout = 2.0\n')
        result = await trio.run_process(
            [*CHATD, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
             "--config", str(config), "--nats", server.url],
            capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 1, other
        assert result.stderr.decode().splitlines()[-1].startswith(
            f"chatd: error: NATS at {server.url} refused the credentials: ")


async def test_a_missing_nkey_file_exits_1_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "chatd.toml"
    config.write_text(f'nats_nkey = "{tmp_path / "missing.nk"}"\n')
    with trio.fail_after(DEADLINE):
        result = await trio.run_process(
            [*CHATD, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
             "--config", str(config), "--nats", "nats://127.0.0.1:4222"],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert lines[-1] == ("chatd: error: cannot use the NATS credentials or TLS files: "
                         f"[Errno 2] No such file or directory: '{tmp_path / 'missing.nk'}'")
    assert not [line for line in lines if line.startswith("Traceback")]
