"""What recording the metrics costs per routed message: python -m benchmarks.metrics_cost.

A routed message is counted and timed on its way through a node: the sender's ``send``
read and its ``sent`` answer (hop 1), the ``msg`` written to the recipient (hop 2, and the
start of hop 3), the recipient's delivered and read acknowledgements (hop 3) and the two
receipts they produce. This replays those statements as chatd's code makes them, on a real
:class:`chatd.metrics.Metrics` and a real session :class:`~chatd.session._writer.Writer`'s
timing methods, in the worst case for them: every read and every write carries one frame,
so nothing is shared between messages (under load a read or a write carries several, and
the clock reads and bisections of a run or a write are shared). The garbage-collector
timing is added as the cost of its two callbacks per collection times the young
collections per routed message, which ``python -m benchmarks`` measures on the chatd server
it runs (:data:`COLLECTIONS_PER_MESSAGE` otherwise).

``python -m benchmarks`` divides the figure by chatd's measured CPU per routed message in
the same run (goal: under 2%).
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections import deque
from collections.abc import Callable

import trio

from chatd.metrics import Metrics
from chatd.protocol import Ack, Msg, Receipt, Send, Sent
from chatd.session._writer import TIMED_UNACKED, Writer

__all__ = ["COLLECTIONS_PER_MESSAGE", "gc_callback_us", "recording_us_per_message"]

#: Young garbage collections per routed message when no measurement is at hand: what
#: the memory store showed in the throughput scenario (about one per 40 messages),
#: rounded up.
COLLECTIONS_PER_MESSAGE = 0.05


def _best(stmt: Callable[[], None], repeat: int, number: int) -> float:
    """Seconds per call of ``stmt``, best of ``repeat``, less the cost of an empty call."""
    def nothing() -> None:
        pass

    best = min(timeit.Timer(stmt).repeat(repeat, number)) / number
    call = min(timeit.Timer(nothing).repeat(repeat, number)) / number
    return max(0.0, best - call)


class _Reader:
    """Where a session's reader keeps the time of its last read."""

    __slots__ = ("last_heard",)

    def __init__(self) -> None:
        self.last_heard = 0.0


def _writer(metrics: Metrics) -> Writer:
    """A writer with only the state its timing methods use (no socket, no session)."""
    writer = Writer.__new__(Writer)
    writer._metrics = metrics
    writer._framed = 0
    writer._stored = []
    writer._unacked = deque(maxlen=TIMED_UNACKED)
    writer.sent_seq = 0
    return writer


def _replay(repeat: int, number: int, per_write: int) -> float:
    """Seconds the recording statements of one routed message take (see the module), when
    each write to the recipient carries ``per_write`` messages and each of the recipient's
    acknowledgements covers one write."""
    metrics = Metrics("bench")
    recipient, sender, reader = _writer(metrics), _writer(metrics), _Reader()
    frames_in, frames_out = metrics.frames_in, metrics.frames_out

    def one_write() -> None:
        for _ in range(per_write):
            # The sender's read: when it was read (the reader reads the clock for its
            # keepalive anyway), the send counted; the router: stored, counted, hop 1.
            read_at = reader.last_heard
            frames_in[Send.INDEX] += 1
            stored = metrics.now()
            accepted = answered = failed = 0
            accepted += 1
            answered += 1
            metrics.messages_sent += accepted
            if answered:
                metrics.send_latency.observe_many(stored - read_at, answered)
            if failed:
                metrics.send_failures += failed
            # The sender's writer: the sent answer.
            frames_out[Sent.INDEX] += 1
            if sender._framed:
                sender._written()
            # The recipient's writer frames the msg (hop 2 noted).
            recipient._framed += 1
            if stored:
                recipient._stored.append(stored)
            recipient.sent_seq += 1
            frames_out[Msg.INDEX] += 1
        # ... and writes them (hop 2 observed, hop 3 starts).
        if recipient._framed:
            recipient._written()
        # The recipient's read: a delivered and a read acknowledgement (hop 3 on the
        # first); the router counts the receipt each produces.
        at = reader.last_heard
        for status in ("delivered", "read"):
            frames_in[Ack.INDEX] += 1
            recipient.acknowledged(recipient.sent_seq, at)
            if status == "read":
                metrics.messages_read += per_write
            else:
                metrics.messages_delivered += per_write
        # The sender's writer: the two receipts.
        for _ in range(2):
            frames_out[Receipt.INDEX] += 1
            if sender._framed:
                sender._written()

    async def run() -> float:
        metrics.use_current_clock()  # the node's clock, as the node sets it
        return _best(one_write, repeat, number // per_write) / per_write

    return trio.run(run)


def gc_callback_us(repeat: int = 7, number: int = 100_000) -> float:
    """Microseconds the garbage-collector timing adds to one collection (its two calls)."""
    metrics = Metrics("bench")
    info = {"generation": 0}

    def one_collection() -> None:
        metrics._on_gc("start", info)
        metrics._on_gc("stop", info)

    return _best(one_collection, repeat, number) * 1e6


def recording_us_per_message(per_write: int = 1, collections: float | None = None,
                             repeat: int = 7, number: int = 100_000) -> float:
    """Microseconds of CPU the metrics take for one routed message (best of ``repeat``).

    Args:
        per_write: Messages per write to the recipient (1: the worst case).
        collections: Young garbage collections per routed message
            (:data:`COLLECTIONS_PER_MESSAGE` if None).
        repeat: Timing rounds.
        number: Messages per round.
    """
    if collections is None:
        collections = COLLECTIONS_PER_MESSAGE
    return (_replay(repeat, number, max(1, per_write)) * 1e6
            + collections * gc_callback_us(repeat, number))


def main() -> None:
    """Print the figure (and write it as JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--per-write", type=int, default=1,
                        help="messages per write to the recipient (default 1, the worst case)")
    args = parser.parse_args()
    cost = recording_us_per_message(args.per_write)
    print(f"metrics recording: {cost:.3f} us per routed message at {args.per_write} per "
          f"write (garbage-collector timing: {gc_callback_us():.3f} us per collection, "
          f"{COLLECTIONS_PER_MESSAGE} collections per message assumed)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"metrics_us_per_msg": cost, "per_write": args.per_write}, fh)


if __name__ == "__main__":
    main()
