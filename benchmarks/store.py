"""Durable store benchmark: appends per second with fsync on, records per fsync, latency.

Three measurements in one run, on the same disk:

1. ``store``: the durable store alone — W concurrent writers each submit messages to the
   store (two replicas, every message fsync'd on both before ``submit`` returns);
2. ``sqlite``: the peer — W threads each insert the same messages into SQLite in WAL mode
   with ``synchronous=FULL``, one transaction per message (what a Python service would do
   to get the same durability from a well-known library);
3. ``node_durable`` and ``node_memory``: end to end — a real ``chatd serve`` process, with
   the durable store and then with the in-memory store, W client connections each sending
   and waiting for ``sent``; the time from writing a ``send`` frame to reading its ``sent``.

4. ``backlog`` (with ``--backlog``, instead of the three above): a store holding a large
   backlog — N queued messages over U users — and what it costs, each phase in a fresh
   process: the RSS per queued message once filled, and once recovered, with the store's
   message-id memory and without it (a second store with ``dedup_max_ids`` 1); the time to
   recover the store from its log alone (no checkpoint: the worst case), and again after
   a checkpoint of the index (what the store writes in the background); how long that
   checkpoint and a full one (every item rewritten, as a repair does) take; and how fast
   every user's backlog streams back through ``pending()`` after a restart (256 at a
   time, as a session's catch-up reads it).

Usage: ``python -m benchmarks.store [--writers 64] [--messages 4000] [--json FILE]``, or
``python -m benchmarks.store --backlog [--queued 1000000] [--users 10000] [--body 100]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

from chatd.actors import ActorTable
from chatd.auth import load_or_create_secret, mint_token
from chatd.backends import Entry, Message
from chatd.backends.embedded import DurableStore
from chatd.client import connect
from chatd.clock import now_ms

BODY = "x" * 100


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of latencies in seconds, as milliseconds."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(pick(0.50) * 1e3, 3), "p99_ms": round(pick(0.99) * 1e3, 3)}


async def bench_store(directory: Path, writers: int, messages: int) -> dict[str, Any]:
    """The durable store alone: concurrent submits, each durable on two replicas."""
    store = DurableStore(ActorTable("bench"), [directory / "r0", directory / "r1"])
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for i in range(messages // writers):
            started = time.perf_counter()
            await store.submit(Message(f"{w}-{i}", f"s{w}", f"r{w % 16}", BODY, now_ms()))
            latencies.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert store.journal is not None
        before = store.journal.stats.fsyncs, store.journal.stats.batches
        started = time.perf_counter()
        async with trio.open_nursery() as writers_nursery:
            for w in range(writers):
                writers_nursery.start_soon(writer, w)
        elapsed = time.perf_counter() - started
        fsyncs = store.journal.stats.fsyncs - before[0]
        batches = store.journal.stats.batches - before[1]
        nursery.cancel_scope.cancel()
    return {"appends_per_s": round(len(latencies) / elapsed), "fsyncs": fsyncs,
            "records_per_fsync": round(len(latencies) / max(batches, 1), 1),
            **percentiles(latencies)}


def bench_sqlite(directory: Path, writers: int, messages: int) -> dict[str, Any]:
    """The peer: SQLite WAL, synchronous=FULL, one transaction per message."""
    path = directory / "peer.sqlite"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE queue (id TEXT PRIMARY KEY, sender TEXT, recipient TEXT, "
                  "body TEXT, ts INTEGER)")
    setup.close()
    latencies: list[float] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        mine = []
        for i in range(messages // writers):
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO queue VALUES (?, ?, ?, ?, ?)",
                       (f"{w}-{i}", f"s{w}", f"r{w % 16}", BODY, now_ms()))
            db.execute("COMMIT")
            mine.append(time.perf_counter() - started)
        db.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"appends_per_s": round(len(latencies) / elapsed), **percentiles(latencies)}


async def bench_node(directory: Path, writers: int, messages: int,
                     store: str) -> dict[str, Any]:
    """End to end through a real daemon: time from writing `send` to reading `sent`."""
    data_dir = directory / f"node-{store}"
    process = subprocess.Popen(
        [sys.executable, "-m", "chatd", "serve", "--port", "0", "--data-dir", str(data_dir),
         "--store", store, "--http-listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        url = ""
        while not url:
            line = process.stderr.readline()
            if not line:
                raise RuntimeError("chatd serve exited before listening")
            record = json.loads(line)
            url = (record.get("url.full", "") if record.get("event.action") == "listening"
                   else "")
        secret = load_or_create_secret(data_dir / "secret")
        latencies: list[float] = []

        async def sender(w: int) -> None:
            async with connect(url, mint_token(secret, f"s{w}", 3600)) as client:
                for i in range(messages // writers):
                    started = time.perf_counter()
                    await client.send(f"r{w % 16}", BODY, id=f"{w}-{i}")
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(sender, w)
        elapsed = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"sent_per_s": round(len(latencies) / elapsed), **percentiles(latencies)}


def rss_bytes() -> int:
    """This process's resident set size, after a full garbage collection (Linux)."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def disk_bytes(directory: Path) -> int:
    """The size of every file under ``directory``."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def backlog_store(directory: Path, dedup_max: int) -> DurableStore:
    """The store of the backlog measurement: no checkpoint unless it is asked for."""
    return DurableStore(ActorTable("bench"), [directory / "r0", directory / "r1"],
                        checkpoint_interval=86400.0, dedup_max=dedup_max)


async def fill_backlog(directory: Path, queued: int, users: int, body: int,
                       dedup_max: int) -> dict[str, Any]:
    """Phase ``fill``: queue ``queued`` messages of ``body`` bytes for ``users`` users, 256
    per ``submit_many`` from 16 concurrent writers; RSS per message."""
    store = backlog_store(directory, dedup_max)
    text = "x" * body
    per_writer = queued // 16
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        before = rss_bytes()
        started = time.perf_counter()

        async def writer(w: int) -> None:
            ts = now_ms()
            for first in range(w * per_writer, (w + 1) * per_writer, 256):
                run = [Message(str(i), f"s{i % 1000}", f"u{i % users}", text, ts)
                       for i in range(first, min(first + 256, (w + 1) * per_writer))]
                for result in await store.submit_many(run):
                    assert not isinstance(result, Exception), result

        async with trio.open_nursery() as writers:
            for w in range(16):
                writers.start_soon(writer, w)
        elapsed = time.perf_counter() - started
        after = rss_bytes()
        nursery.cancel_scope.cancel()
    count = per_writer * 16
    return {"queued": count, "fill_per_s": round(count / elapsed),
            "rss_mib": round(after / 2**20, 1),
            "rss_per_message": round((after - before) / count, 1),
            "disk_bytes_per_replica": disk_bytes(directory / "r0")}


async def recover_backlog(directory: Path, dedup_max: int, stream: bool,
                          checkpoint: str) -> dict[str, Any]:
    """Phase ``recover``: recover the store and time it; then stream every user's backlog
    through ``pending()`` if ``stream``; then write a checkpoint (``index``, ``full``) if
    asked."""
    before = rss_bytes()
    store = backlog_store(directory, dedup_max)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        await nursery.start(store.run)
        results["recovery_s"] = round(time.perf_counter() - started, 2)
        results["rss_per_message"] = round(
            (rss_bytes() - before) / max(1, store.index.pending_total), 1)
        results["ids"] = len(store.index.ids)
        if stream:
            users = sorted(store.index.waiting())
            streamed = 0
            started = time.perf_counter()
            for user in users:
                after = 0
                while True:
                    entries: Any = await store.pending(user, after, 256)
                    if not entries:
                        break
                    streamed += len(entries)
                    last: Entry = entries[-1]
                    after = last.seq
            elapsed = time.perf_counter() - started
            results["streamed"] = streamed
            results["stream_per_s"] = round(streamed / elapsed)
            results["rss_after_stream_mib"] = round(rss_bytes() / 2**20, 1)
        if checkpoint != "-":
            started = time.perf_counter()
            await store.checkpoint(rewrite=checkpoint == "full")
            results[f"{checkpoint}_checkpoint_s"] = round(time.perf_counter() - started, 2)
            results["disk_bytes_after_checkpoint"] = disk_bytes(directory / "r0")
        nursery.cancel_scope.cancel()
    return results


def phase(args: list[str]) -> dict[str, Any]:
    """Run one phase of the backlog measurement in a fresh process; its JSON figures."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.store", "--phase", *args],
                         capture_output=True, text=True, check=False)
    if run.returncode:
        raise RuntimeError(f"phase {args[0]} failed:\n{run.stderr}")
    figures: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
    return figures


def bench_backlog(base: Path, queued: int, users: int, body: int) -> dict[str, Any]:
    """The backlog measurement, phase by phase (see the module's docstring)."""
    shape = [str(queued), str(users), str(body)]
    results: dict[str, Any] = {"queued": queued, "users": users, "body_bytes": body}
    print(f"backlog: {queued} messages of {body} bytes for {users} users ...", flush=True)
    steps = [
        ("fill_without_ids", ["fill", "noids", *shape, "1"]),
        ("recover_without_ids", ["recover", "noids", "1", "-", "-"]),
        ("fill", ["fill", "backlog", *shape, "1000000"]),
        ("recover_log", ["recover", "backlog", "1000000", "stream", "index"]),
        ("recover_checkpoint", ["recover", "backlog", "1000000", "-", "full"]),
        ("recover_full_checkpoint", ["recover", "backlog", "1000000", "-", "-"]),
    ]
    for name, args in steps:
        args[1] = str(base / args[1])
        results[name] = phase(args)
        print(f"  {name}: {results[name]}", flush=True)
        if name == "recover_without_ids":
            shutil.rmtree(base / "noids")
    return results


def run_phase(argv: list[str]) -> None:
    """``--phase fill DIR QUEUED USERS BODY DEDUP_MAX`` or ``--phase recover DIR DEDUP_MAX
    STREAM|- index|full|-``: print the phase's figures as one JSON line."""
    if argv[0] == "fill":
        directory, queued, users, body, dedup_max = argv[1:]
        figures = trio.run(fill_backlog, Path(directory), int(queued), int(users), int(body),
                           int(dedup_max))
    else:
        directory, dedup_max, stream, checkpoint = argv[1:]
        figures = trio.run(recover_backlog, Path(directory), int(dedup_max),
                           stream == "stream", checkpoint)
    print(json.dumps(figures))


def main() -> None:
    """Run the measurements and print them (and write JSON if asked)."""
    if sys.argv[1:2] == ["--phase"]:
        run_phase(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--backlog", action="store_true",
                        help="measure a large backlog instead (RSS, recovery, streaming)")
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--dir", type=Path, help="where to put the files (default: a temp "
                        "directory on the same disk as the current directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.backlog:
        with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd()) as tmp:
            backlog = bench_backlog(Path(tmp), args.queued, args.users, args.body)
        if args.json:
            args.json.write_text(json.dumps(backlog, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd()) as tmp:
        base = Path(tmp)
        results: dict[str, Any] = {
            "writers": args.writers, "messages": args.messages,
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                        "sqlite": sqlite3.sqlite_version},
        }
        print(f"store: {args.writers} writers, {args.messages} messages ...", flush=True)
        results["store"] = trio.run(bench_store, base / "store", args.writers, args.messages)
        print(f"  {results['store']}", flush=True)
        print("sqlite peer ...", flush=True)
        (base / "sqlite").mkdir()
        results["sqlite"] = bench_sqlite(base / "sqlite", args.writers, args.messages)
        print(f"  {results['sqlite']}", flush=True)
        for store in ("durable", "memory"):
            print(f"node end to end, {store} store ...", flush=True)
            results[f"node_{store}"] = trio.run(bench_node, base, args.writers, args.messages,
                                                store)
            print(f"  {results[f'node_{store}']}", flush=True)
        results["ratio_appends_store_vs_sqlite"] = round(
            results["store"]["appends_per_s"] / results["sqlite"]["appends_per_s"], 2)
        print(f"store / sqlite appends per second: {results['ratio_appends_store_vs_sqlite']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
