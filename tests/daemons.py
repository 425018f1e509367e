"""Real ``chatd serve`` processes for tests: start on a free port, read their JSON logs.

Shared by the command-line tests and the crash tests.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from chatd.auth import mint_token, read_secret

__all__ = ["CHATD", "DEADLINE", "Daemon", "action", "refusing_url", "run", "serve"]

CHATD = [sys.executable, "-m", "chatd"]
#: Seconds any single wait on a daemon may take.
DEADLINE = 20


def action(record: dict[str, Any]) -> Any:
    """What a log record says happened: its ``event.action`` (``not_json`` for a line that
    was not JSON: then ``line`` holds it).

    The records are ECS documents with dotted keys (docs/operations.md section 5):
    ``record["log.level"]``, ``record["service.node.name"]``, ``record["chatd.worker"]``...
    """
    return record.get("event.action")


class Daemon:
    """A running ``chatd serve`` process and the JSON log records it has written."""

    def __init__(self, process: trio.Process, data_dir: Path) -> None:
        self.process = process
        self.data_dir = data_dir
        self.records: list[dict[str, Any]] = []
        self.url = ""
        self._ready = trio.Event()

    async def read_logs(self) -> None:
        """Collect stderr lines until EOF; wake :meth:`wait_listening` either way."""
        assert self.process.stderr is not None
        buffer = b""
        try:
            async for chunk in self.process.stderr:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._record(line)
        finally:
            self._ready.set()

    def _record(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event.action": "not_json", "line": line.decode(errors="replace")}
        self.records.append(record)
        if action(record) == "listening":
            self.url = record["url.full"]
            self._ready.set()

    async def wait_listening(self) -> None:
        with trio.fail_after(DEADLINE):
            await self._ready.wait()
        assert self.url, f"chatd serve did not start: {self.records}"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if action(r) == name]

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("log.level") == "error"]

    def token(self, user: str) -> str:
        return mint_token(read_secret(self.data_dir / "secret"), user, 3600.0)

    async def crash(self) -> None:
        """SIGKILL the daemon and reap it."""
        self.process.kill()
        with trio.fail_after(DEADLINE):
            status = await self.process.wait()
        assert status == -signal.SIGKILL


@asynccontextmanager
async def serve(data_dir: Path, *args: str, cwd: Path | None = None,
                graceful: bool = False) -> AsyncIterator[Daemon]:
    """Run ``chatd serve`` on a free port until the block ends.

    Args:
        data_dir: The data directory; passed as ``--data-dir`` unless ``cwd`` is given,
            in which case the daemon runs there on its default (``cwd/chatd-data``).
        args: More ``chatd serve`` options.
        graceful: End with SIGTERM and expect exit status 0 (else SIGKILL).
    """
    argv = [*CHATD, "serve", "--port", "0", "--http-listen", "127.0.0.1:0", *args]
    if cwd is None:
        argv += ["--data-dir", str(data_dir)]
    else:
        data_dir = cwd / "chatd-data"
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, cwd=cwd)
    server = Daemon(process, data_dir)
    status: int | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.read_logs)
            try:
                await server.wait_listening()
                yield server
                if graceful:
                    status = await _stop(process)
            finally:
                await _reap(process)  # also ends read_logs (EOF)
    finally:
        await _reap(process)
        assert process.stderr is not None
        await process.stderr.aclose()
    if graceful:
        assert status == 0, f"chatd serve exited {status}"


async def _stop(process: trio.Process) -> int:
    """SIGTERM ``process`` unless it has exited, and wait for its status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with trio.fail_after(DEADLINE):
        return await process.wait()


async def _reap(process: trio.Process) -> None:
    """SIGKILL ``process`` unless it has exited, and wait for it."""
    if process.poll() is None:
        process.kill()
    with trio.fail_after(DEADLINE) as scope:
        scope.shield = True
        await process.wait()


async def run(args: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a ``chatd`` client command to completion; (status, stdout, stderr)."""
    with trio.fail_after(DEADLINE):
        result = await trio.run_process([*CHATD, *args], stdin=stdin, capture_stdout=True,
                                        capture_stderr=True, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def first_line(stream: trio.abc.ReceiveStream) -> bytes:
    """Read from a process's output until the end of its first line (with a deadline).

    Returns:
        Everything read, which ends with that line's newline.
    """
    data = b""
    with trio.fail_after(DEADLINE):
        while not data.endswith(b"\n"):
            data += await stream.receive_some()
    return data


@contextmanager
def refusing_url() -> Iterator[str]:
    """A ``ws://`` URL on loopback whose port refuses connections while the block runs.

    The port is bound and never listened on: a connection to it is refused, and nothing
    else can take the port meanwhile (unlike a port merely closed again, or a well-known
    one such as 9 that some machine may serve).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"
