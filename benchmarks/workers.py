"""The harness's side of the load generator: worker processes, requests, and a progress bar.

A :class:`Pool` starts ``python -m benchmarks.loadgen`` processes (never the server's
process) and sends them commands (see :mod:`benchmarks.loadgen`); every reply is awaited
with a deadline, and a worker that dies or answers with an error stops the benchmark with a
one-line :class:`~benchmarks.servers.BenchError` that quotes its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from benchmarks.servers import LIVE, BenchError, prepare_child, tail

__all__ = ["Pool", "Progress", "WorkerHandle"]

#: Seconds a command may take unless the caller gives its own deadline.
DEADLINE = 60.0


class Progress:
    """A one-line progress bar on stderr, redrawn in place; on a pipe, a line every ~10 %."""

    def __init__(self, label: str, total: float, unit: str = "",
                 stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1e-9)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.step = -1
        self.start = self.last = time.monotonic()

    def update(self, done: float, note: str = "") -> None:
        fraction = min(max(done / self.total, 0.0), 1.0)
        if self.tty:
            bar = "#" * int(30 * fraction) + "." * (30 - int(30 * fraction))
            self.stream.write(f"\r  {self.label} [{bar}] {self._count(done)} {note}\x1b[K")
            self.stream.flush()
        elif int(fraction * 10) > self.step and (fraction >= 1.0 or self._quiet_for(1.0)):
            self.step = int(fraction * 10)
            self.last = time.monotonic()
            self.stream.write(f"  {self.label}: {fraction:4.0%} {self._count(done)} {note}\n")
            self.stream.flush()

    def _quiet_for(self, seconds: float) -> bool:
        return time.monotonic() - self.last >= seconds

    def _count(self, done: float) -> str:
        if self.unit == "s":
            digits = 0 if self.total >= 10 else 1
            return f"{done:.{digits}f}/{self.total:.{digits}f} s"
        return f"{done:,.0f}/{self.total:,.0f}{self.unit}"

    def finish(self, note: str = "") -> None:
        elapsed = time.monotonic() - self.start
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"  {self.label}: done in {elapsed:.1f} s {note}\n")
        self.stream.flush()

    async def sleep(self, seconds: float, check: Callable[[], None] | None = None) -> None:
        """Sleep ``seconds``, redrawing the bar twice a second and calling ``check``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(0.5, left))
            if check is not None:
                check()
            self.update(seconds - max(end - time.monotonic(), 0.0))


class WorkerHandle:
    """One load-generator process and its command pipe."""

    def __init__(self, index: int, logdir: Path) -> None:
        self.index = index
        self.stderr = logdir / f"loadgen-{index}.stderr"
        self.process: asyncio.subprocess.Process | None = None
        self.done = 0  # last progress count reported

    async def start(self) -> None:
        with open(self.stderr, "wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.loadgen", "--worker", str(self.index),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                limit=1 << 26, cwd=Path(__file__).resolve().parent.parent,
                preexec_fn=prepare_child)
        LIVE.add(self.process)

    def failure(self, what: str) -> BenchError:
        code = self.process.returncode if self.process else None
        status = "" if code is None else f" (exit status {code})"
        return BenchError(f"load generator {self.index} {what}{status}; "
                          f"stderr: {tail(self.stderr) or '-'}")

    async def request(self, cmd: str, timeout: float = DEADLINE,
                      on_progress: Callable[[], None] | None = None,
                      **args: Any) -> dict[str, Any]:
        """Send one command and return its reply; progress lines update :attr:`done`."""
        process = self.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            await self._reap()
            raise self.failure(f"died before {cmd!r}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(process.stdout.readline(),
                                              max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise self.failure(f"did not answer {cmd!r} within {timeout:.0f} s") from None
            if not line:
                await self._reap()
                raise self.failure(f"died during {cmd!r}")
            message = json.loads(line)
            if message.get("type") == "progress":
                self.done = message["done"]
                if on_progress is not None:
                    on_progress()
                continue
            if "error" in message:
                raise self.failure(f"failed {cmd!r}: {message['error']}")
            return dict(message)

    async def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 2.0)

    async def stop(self) -> None:
        """Ask the worker to quit; kill it if it does not within a few seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()  # end of input: the worker aborts its sessions and ends
            await asyncio.wait_for(process.wait(), 5.0)
        except (TimeoutError, OSError):
            pass
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            LIVE.discard(process)


class Pool:
    """``size`` load-generator workers, started together and always stopped together."""

    def __init__(self, size: int, logdir: Path | None = None) -> None:
        self.logdir = logdir or Path(tempfile.gettempdir())
        self.workers = [WorkerHandle(i, self.logdir) for i in range(size)]

    async def __aenter__(self) -> Pool:
        try:
            for worker in self.workers:
                await worker.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, index: int) -> WorkerHandle:
        return self.workers[index]

    async def all(self, cmd: str, per_worker: Sequence[dict[str, Any]] | None = None,
                  timeout: float = DEADLINE, on_progress: Callable[[], None] | None = None,
                  **args: Any) -> list[dict[str, Any]]:
        """Send ``cmd`` to every worker at once (with shared ``args`` and, per worker,
        ``per_worker[i]``) and return the replies in worker order."""
        tasks = [asyncio.ensure_future(w.request(
            cmd, timeout, on_progress, **args, **(per_worker[i] if per_worker else {})))
            for i, w in enumerate(self.workers)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    @property
    def done(self) -> int:
        """Sum of the workers' latest progress counts."""
        return sum(w.done for w in self.workers)
