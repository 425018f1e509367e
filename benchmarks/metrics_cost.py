"""What recording the metrics costs per routed message: python -m benchmarks.metrics_cost.

The hot path records a routed message with counter bumps and one histogram observation on a
:class:`chatd.metrics.Metrics` object. This replays exactly the recording statements one
message of the throughput scenario goes through (its ``send`` and ``sent``, its ``msg``, the
recipient's delivered and read acknowledgements and the two receipts they produce), on a
real ``Metrics`` object, and times them. ``python -m benchmarks`` divides the figure by
chatd's measured CPU per routed message in the same run (goal: under 2%).
"""

from __future__ import annotations

import argparse
import json
import timeit

from chatd.metrics import Metrics
from chatd.protocol import Ack, Error, Msg, Receipt, Send, Sent

__all__ = ["recording_us_per_message"]


def recording_us_per_message(repeat: int = 7, number: int = 200_000) -> float:
    """Microseconds of CPU the metrics take for one routed message (best of ``repeat``)."""
    metrics = Metrics("bench")
    frames_in, frames_out = metrics.frames_in, metrics.frames_out
    acked = metrics.messages_acked
    observe = metrics.send_latency.observe
    sent = Sent("m1", 1)

    def one_message() -> None:
        # The sender's session: the send read, its latency, its answer written.
        frames_in[Send.TYPE] += 1
        if isinstance(sent, Sent):
            observe(0.0004)
        metrics.messages_sent += 1
        frames_out[Sent.TYPE] += 1
        if type(sent) is Error:
            metrics.errors["x"] += 1
        # The recipient's session: the msg written, the two acknowledgements read.
        frames_out[Msg.TYPE] += 1
        if type(sent) is Error:
            metrics.errors["x"] += 1
        frames_in[Ack.TYPE] += 1
        frames_in[Ack.TYPE] += 1
        # The router: one id in each receipt; the sender's session writes both receipts.
        acked["delivered"] += 1
        acked["read"] += 1
        for _ in range(2):
            frames_out[Receipt.TYPE] += 1
            if type(sent) is Error:
                metrics.errors["x"] += 1

    def nothing() -> None:
        pass

    timer = timeit.Timer(one_message)
    empty = timeit.Timer(nothing)
    best = min(timer.repeat(repeat, number)) / number
    call = min(empty.repeat(repeat, number)) / number
    return max(0.0, best - call) * 1e6


def main() -> None:
    """Print the figure (and write it as JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    cost = recording_us_per_message()
    print(f"metrics recording: {cost:.3f} us per routed message")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"metrics_us_per_msg": cost}, fh)


if __name__ == "__main__":
    main()
