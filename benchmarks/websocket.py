"""WebSocket layer micro-benchmark: microseconds to parse and to encode one message.

The server's RFC 6455 layer (:mod:`chatd.protocol.websocket`) is on every message's path,
so its cost per message is measured here on its own, without sockets or an event loop:

* ``parse``: ``FrameReader.feed`` of one masked 140-byte binary message (the size of a
  ``send`` frame with a 100-character body), the usual case of one ``recv`` bringing one
  message;
* ``parse_batch16``: sixteen such messages in one ``feed``, per message;
* ``parse_text``: one masked 140-byte text message (refused by chatd's protocol above this
  layer, but the layer decodes it);
* ``parse_fragmented``: one 140-byte text message in four fragments, in one ``feed``;
* ``parse_1MiB_in_reads``: one 1 MiB binary message fed in 1448-byte reads (one TCP
  segment each), in microseconds for the whole message: what a large message arriving in
  many small reads costs, which grows with the square of its size if the receive buffer is
  copied on every read;
* ``encode``: ``encode_frame`` of one 140-byte binary message.

Each figure is the best of ``--repeat`` timed loops, timed in CPU time of this process
(``time.process_time``) so that other processes on a busy machine disturb it less.
``--against REV`` loads ``chatd/protocol/websocket.py`` as it was at git revision ``REV``
and measures it beside the working tree's, loop for loop in turn, so that a change is
compared on the same machine in the same run.

Usage: ``python -m benchmarks.websocket [--against REV] [--repeat 25] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatd.protocol import websocket

ROOT = Path(__file__).resolve().parent.parent
MASK = b"\x37\xfa\x21\x3d"
PAYLOAD = bytes(range(140))
TEXT = ("x" * 138 + "\u00e9").encode()
BIG = 1 << 20
SEGMENT = 1448


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame, as a browser would send it."""
    size = len(payload)
    if size < 126:
        head = bytes((fin << 7 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((fin << 7 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((fin << 7 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    masked = bytes(byte ^ MASK[index % 4] for index, byte in enumerate(payload))
    return head + MASK + masked


def load(revision: str) -> types.ModuleType:
    """``chatd/protocol/websocket.py`` as it was at ``revision``, as a module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:chatd/protocol/websocket.py"], cwd=ROOT, check=True,
        capture_output=True, text=True).stdout
    module = types.ModuleType(f"websocket_{revision}")
    exec(compile(source, f"{revision}:chatd/protocol/websocket.py", "exec"), module.__dict__)
    return module


def cases(ws: types.ModuleType) -> dict[str, tuple[Callable[[int], None], int]]:
    """Each measurement: a function running the operation ``n`` times, and its ``n``."""
    one = client_frame(ws.OP_BINARY, PAYLOAD)
    batch = one * 16
    text = client_frame(ws.OP_TEXT, TEXT)
    pieces = [TEXT[:35], TEXT[35:70], TEXT[70:105], TEXT[105:]]
    fragmented = b"".join(
        client_frame(ws.OP_TEXT if i == 0 else 0, piece, fin=i == 3)
        for i, piece in enumerate(pieces))
    big = client_frame(ws.OP_BINARY, bytes(BIG))
    reads = [big[i:i + SEGMENT] for i in range(0, len(big), SEGMENT)]

    def feeding(data: bytes, count: int = 1) -> Callable[[int], None]:
        def run(n: int) -> None:
            feed = ws.FrameReader(1 << 21).feed
            for _ in range(n):
                events = feed(data)
            assert len(events) == count
        return run

    def in_reads(n: int) -> None:
        for _ in range(n):
            feed = ws.FrameReader(1 << 21).feed
            for chunk in reads:
                events = feed(chunk)
            assert len(events) == 1

    def encoding(n: int) -> None:
        encode, opcode = ws.encode_frame, ws.OP_BINARY
        for _ in range(n):
            encode(opcode, PAYLOAD)

    return {
        "parse": (feeding(one), 20_000),
        "parse_batch16": (feeding(batch, 16), 2_000),
        "parse_text": (feeding(text), 20_000),
        "parse_fragmented": (feeding(fragmented), 5_000),
        "parse_1MiB_in_reads": (in_reads, 1),
        "encode": (encoding, 200_000),
    }


#: How many messages one operation of each case handles (per-message figures divide by it).
PER_OPERATION = {"parse_batch16": 16}


def measure(modules: dict[str, types.ModuleType], repeat: int) -> dict[str, dict[str, float]]:
    """Microseconds per message of every case, for every module, the best of ``repeat``."""
    runs = {name: cases(module) for name, module in modules.items()}
    best: dict[str, dict[str, float]] = {name: {} for name in modules}
    for case in runs[next(iter(runs))]:
        for _ in range(repeat):
            for name, module_cases in runs.items():
                run, n = module_cases[case]
                started = time.process_time()
                run(n)
                elapsed = time.process_time() - started
                per = elapsed / n / PER_OPERATION.get(case, 1) * 1e6
                best[name][case] = min(best[name].get(case, per), per)
    return {name: {case: round(us, 3) for case, us in figures.items()}
            for name, figures in best.items()}


def main() -> None:
    """Measure, print a table, and write JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV",
                        help="also measure websocket.py as it was at this git revision")
    parser.add_argument("--repeat", type=int, default=25, help="timed loops per case (25)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    modules = {"tree": websocket}
    if args.against:
        modules[args.against] = load(args.against)
    figures = measure(modules, args.repeat)
    names = list(modules)
    print(f"{'us per message':<22}" + "".join(f"{name:>14}" for name in names)
          + ("      ratio" if len(names) > 1 else ""))
    for case in figures["tree"]:
        row = f"{case:<22}" + "".join(f"{figures[name][case]:>14.3f}" for name in names)
        if len(names) > 1:
            row += f"{figures['tree'][case] / figures[names[1]][case]:>11.2f}"
        print(row)
    results: dict[str, Any] = {"python": platform.python_version(), "us_per_message": figures}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
