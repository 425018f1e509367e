"""What a client says when it cannot connect: the cause of each failed attempt.

The client commands and the library against ports that refuse connections (bound, never
listening) and against a TLS server whose certificate comes from a CA the client does not
trust (made with trustme in the test). ``chatd send`` tries each ``--url`` once, reporting on
stderr the cause of each failed attempt but the last, and gives up with ``cannot connect:
URL: CAUSE``; ``chatd listen`` tries forever and reports each failure as it happens.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from functools import partial

import pytest
import trio
import trustme
from daemons import CHATD, DEADLINE, refusing_url, run

from chatd.client import Backoff, ConnectFailed, Failure, connect

pytestmark = pytest.mark.slow

FAST = Backoff(initial=0.05, maximum=0.2)
#: Seconds within which a command that cannot connect must have given up: far less than
#: its --timeout.
QUICK = 5.0
UNTRUSTED = "TLS: certificate verify failed: unable to get local issuer certificate"


@asynccontextmanager
async def untrusted_tls_server() -> AsyncIterator[str]:
    """A TLS server on loopback whose certificate comes from a CA nobody trusts; its
    ``wss://`` URL."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client refused the cert
            await stream.receive_some()
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, host="127.0.0.1"),
                                        handle, 0, context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        yield f"wss://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_send_to_a_refusing_port_says_refused_at_once() -> None:
    with refusing_url() as url:
        started = trio.current_time()
        status, out, err = await run(["send", "--url", url, "--token", "x", "--to", "bob",
                                      "--timeout", "30", "hi"])
    assert trio.current_time() - started < QUICK
    assert (status, out) == (1, "")
    assert err == f"chatd: error: cannot connect: {url}: Connection refused\n"


async def test_send_tries_each_url_once_and_reports_each_cause() -> None:
    with refusing_url() as first, refusing_url() as second:
        started = trio.current_time()
        status, out, err = await run(["send", "--url", first, "--url", second, "--token", "x",
                                      "--to", "bob", "--timeout", "30", "hi"])
    assert trio.current_time() - started < QUICK
    assert (status, out) == (1, "")
    assert err.splitlines() == [f"chatd: cannot connect: {first}: Connection refused",
                                f"chatd: error: cannot connect: {second}: Connection refused"]


async def test_listen_reports_every_failed_attempt_while_it_keeps_trying() -> None:
    with refusing_url() as first, refusing_url() as second:
        listen = await trio.lowlevel.open_process(
            [*CHATD, "listen", "--url", first, "--url", second, "--token", "x"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert listen.stderr is not None
            seen = b""
            wanted = {f"chatd: cannot connect: {url}: Connection refused" for url in
                      (first, second)}
            with trio.fail_after(DEADLINE):
                # Twice round: it goes on after trying every URL.
                while sum(line in wanted for line in seen.decode().splitlines()) < 4:
                    seen += await listen.stderr.receive_some()
            assert listen.poll() is None
        finally:
            listen.kill()
            await listen.wait()
    lines = seen.decode().splitlines()
    assert set(lines[:4]) == wanted, lines


async def test_a_deadline_passing_while_listen_tries_says_the_last_cause() -> None:
    with refusing_url() as first, refusing_url() as second:
        status, out, err = await run(["listen", "--url", first, "--url", second, "--token",
                                      "x", "--timeout", "1"])
    assert (status, out) == (1, "")
    last = err.splitlines()[-1]
    assert re.fullmatch(rf"chatd: error: timed out after 1.0 s \(last: cannot connect: "
                        rf"({re.escape(first)}|{re.escape(second)}): Connection refused\)",
                        last), last


async def test_send_to_an_untrusted_certificate_says_tls() -> None:
    async with untrusted_tls_server() as url:
        started = trio.current_time()
        status, out, err = await run(["send", "--url", url, "--token", "x", "--to", "bob",
                                      "--timeout", "30", "hi"])
    assert trio.current_time() - started < QUICK
    assert (status, out) == (1, "")
    assert err == f"chatd: error: cannot connect: {url}: {UNTRUSTED}\n"


async def test_library_gives_up_after_its_attempts_with_the_last_cause() -> None:
    failures: list[Failure] = []
    async with untrusted_tls_server() as untrusted:
        with ExitStack() as stack, trio.fail_after(QUICK):
            refusing = stack.enter_context(refusing_url())
            with pytest.raises(ConnectFailed) as failed:
                async with connect([refusing, untrusted], "x", attempts=3, backoff=FAST,
                                   on_retry=failures.append):
                    pytest.fail("connected")
    assert (failed.value.url, failed.value.cause) == (refusing, "Connection refused")
    assert failures == [Failure(refusing, "Connection refused"), Failure(untrusted, UNTRUSTED)]
    assert str(failures[1]) == f"cannot connect: {untrusted}: {UNTRUSTED}"


async def test_library_names_an_http_answer_and_a_bad_url() -> None:
    async def answer_404(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"),
                                        answer_404, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(QUICK), pytest.raises(ConnectFailed) as failed:
            async with connect(f"ws://127.0.0.1:{port}", "x"):
                pytest.fail("connected")
        nursery.cancel_scope.cancel()
    assert failed.value.cause == "the server answered HTTP 404, not a WebSocket handshake"
    with pytest.raises(ValueError, match=re.escape("URL must be ws://HOST:PORT or "
                                                   "wss://HOST:PORT, not 'http://x'")):
        async with connect("http://x", "x"):
            pytest.fail("connected")
