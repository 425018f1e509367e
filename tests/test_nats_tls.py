"""TLS between chatd and NATS: a real nats-server that only speaks TLS, with a certificate
from a private CA (made by trustme), and real ``chatd serve`` processes.

chatd trusts the private CA when ``nats_tls_ca`` names it, and serves; without it, it
refuses to start with one line that says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trustme
from daemons import CHATD, DEADLINE, serve
from natsservers import nats_server

from chatd.client import connect
from chatd.protocol import Msg

pytestmark = pytest.mark.slow


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
            assert connected and connected[0]["url"] == url
            with trio.fail_after(DEADLINE):
                async with (connect(daemon.url, daemon.token("alice")) as alice,
                            connect(daemon.url, daemon.token("bob")) as bob):
                    sent = await alice.send("bob", "over TLS")
                    async for event in bob.events():
                        assert isinstance(event, Msg) and event.id == sent.id
                        break


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
