"""``wss://`` served by chatd itself: ``--tls-cert`` / ``--tls-key`` (or ``tls_cert`` /
``tls_key`` in the TOML file), and clients that trust a private CA (``--ca-file``, or
``connect(..., ca=...)``).

The CA and the server's certificate (for 127.0.0.1) are made by trustme in each test. The
daemons are real ``chatd serve`` processes; the clients are the CLI and the library.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from daemons import CHATD, DEADLINE, run, serve

from chatd.client import ConnectFailed, connect
from chatd.protocol import Msg

pytestmark = pytest.mark.slow


@attrs.frozen
class Pki:
    """A private CA's certificate, and a certificate for 127.0.0.1 it issued, with its key."""

    ca: Path
    cert: Path
    key: Path
    other_key: Path  # the key of another certificate


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    issued, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    files = Pki(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem",
                tmp_path / "other-key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    other.private_key_pem.write_to_path(str(files.other_key))
    return files


def tls_options(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]


def chatd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHATD, *args], capture_output=True, text=True, timeout=DEADLINE,
                          check=False)


async def test_serve_tls_and_the_cli_trusting_a_private_ca(tmp_path: Path, pki: Pki) -> None:
    async with serve(tmp_path / "data", *tls_options(pki)) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        base = ["--url", server.url, "--ca-file", str(pki.ca)]
        status, out, err = await run(["send", *base, "--token", server.token("alice"),
                                      "--to", "bob", "over TLS"])
        assert status == 0, err
        assert json.loads(out)["type"] == "sent"
        status, out, err = await run(["listen", *base, "--token", server.token("bob"),
                                      "--count", "1"])
        assert status == 0, err
        assert json.loads(out)["body"] == "over TLS"
        # Without the CA, the certificate is refused, and said so.
        status, out, err = await run(["lastseen", "--url", server.url, "--token",
                                      server.token("bob"), "alice"])
        assert (status, out) == (1, "")
        assert err == (f"chatd: error: cannot connect: {server.url}: TLS: certificate verify "
                       "failed: unable to get local issuer certificate\n")
    assert not server.errors()


async def test_serve_tls_from_the_config_file_and_the_library_with_ca(
        tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "chatd.toml"
    config.write_text(f'tls_cert = "{pki.cert}"\ntls_key = "{pki.key}"\n')
    context = ssl.create_default_context(cafile=pki.ca)
    async with serve(tmp_path / "data", "--config", str(config)) as server:
        assert server.url.startswith("wss://")
        with trio.fail_after(DEADLINE):
            async with (connect(server.url, server.token("alice"), ca=pki.ca) as alice,
                        connect(server.url, server.token("bob"), ca=context) as bob):
                await alice.send("bob", "hello", id="m1")
                async for event in bob.events():
                    if isinstance(event, Msg):
                        assert (event.id, event.body) == ("m1", "hello")
                        break
            with pytest.raises(ConnectFailed, match="certificate verify failed"):
                async with connect(server.url, server.token("carol")):
                    pytest.fail("connected without trusting the CA")


@pytest.mark.parametrize(("files", "expected"), [
    (("missing", "key"), "cannot read the TLS certificate {missing}: No such file or directory"),
    (("cert", "missing"), "cannot read the TLS key {missing}: No such file or directory"),
    (("key", "key"), "the TLS certificate {key} holds no PEM certificate"),
    (("cert", "cert"), "the TLS key {cert} holds no PEM private key"),
    (("cert", "other_key"), "the TLS key {other_key} is not the key of the certificate {cert}"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_tls_files_exit_1_in_one_line_before_listening(
        tmp_path: Path, pki: Pki, files: tuple[str, str], expected: str, workers: int) -> None:
    paths = {"missing": tmp_path / "missing.pem", **{name: getattr(pki, name)
                                                    for name in ("cert", "key", "other_key")}}
    cert, key = (paths[name] for name in files)
    result = chatd("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                   "--workers", str(workers), "--tls-cert", str(cert), "--tls-key", str(key))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"chatd: error: {expected.format(**paths)}"]


def test_tls_cert_without_key_is_a_configuration_error(tmp_path: Path, pki: Pki) -> None:
    result = chatd("serve", "--port", "0", "--data-dir", str(tmp_path), "--tls-cert",
                   str(pki.cert))
    assert result.returncode == 2
    assert result.stderr == "chatd: error: tls_cert and tls_key go together\n"


async def test_plain_clients_on_the_tls_port_disturb_no_one(tmp_path: Path, pki: Pki) -> None:
    """Plain WebSocket, plain garbage and a client refusing the certificate come and go on
    the TLS port while a TLS session is open: it goes on, and the node logs no error."""
    async with serve(tmp_path / "data", *tls_options(pki)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with trio.fail_after(DEADLINE):
            async with (connect(server.url, server.token("alice"), ca=pki.ca) as alice,
                        connect(server.url, server.token("bob"), ca=pki.ca) as bob):
                plain = f"ws://127.0.0.1:{port}"
                status, _, err = await run(["send", "--url", plain, "--token",
                                            server.token("carol"), "--to", "bob", "plain"])
                assert status == 1
                assert err == (f"chatd: error: cannot connect: {plain}: the server closed the "
                               "connection during the WebSocket handshake\n")
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"\x00" * 100 + b"\r\n\r\n")
                while await stream.receive_some():  # perhaps a TLS alert, then the end
                    pass
                await stream.aclose()
                with pytest.raises(ConnectFailed, match="certificate verify failed"):
                    async with connect(server.url, server.token("carol")):
                        pytest.fail("connected without trusting the CA")
                await alice.send("bob", "still here", id="m1")
                async for event in bob.events():
                    if isinstance(event, Msg):
                        assert event.body == "still here"
                        break
    assert not server.errors(), server.errors()


async def test_wss_to_a_plain_server_says_it_does_not_speak_tls(tmp_path: Path) -> None:
    async with serve(tmp_path / "data") as server:
        url = server.url.replace("ws://", "wss://")
        status, out, err = await run(["send", "--url", url, "--token", server.token("alice"),
                                      "--to", "bob", "hi"])
    assert (status, out) == (1, "")
    assert err.startswith(f"chatd: error: cannot connect: {url}: TLS: "), err


def test_ca_file_that_cannot_be_used_is_one_line(tmp_path: Path, pki: Pki) -> None:
    for ca, expected in ((tmp_path / "none.pem", f"cannot read the CA file {tmp_path}/none.pem: "
                          "No such file or directory"),
                         (pki.key, f"the CA file {pki.key} holds no PEM certificate")):
        result = chatd("send", "--url", "wss://127.0.0.1:1", "--ca-file", str(ca), "--token",
                       "x", "--to", "bob", "hi")
        assert (result.returncode, result.stderr) == (1, f"chatd: error: {expected}\n")

