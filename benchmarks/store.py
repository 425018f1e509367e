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

Usage: ``python -m benchmarks.store [--writers 64] [--messages 4000] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from chatd.backends import Message
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


def main() -> None:
    """Run the three measurements and print them (and write JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--dir", type=Path, help="where to put the files (default: a temp "
                        "directory on the same disk as the current directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
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
