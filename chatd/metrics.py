"""A node's metrics: plain counters on the hot path, Prometheus families at scrape time.

Counting a frame or a message must cost next to nothing on the routed-message path, so the
hot path only bumps Python integers and entries of plain lists on a :class:`Metrics` object
(no locks, no label lookups: frames are counted in lists indexed by ``Frame.INDEX``, which
costs half of a dictionary keyed by type tag), and :class:`Histogram` puts a latency in its
bucket with one bisection, once for every message of a batch that shares the latency.
Latencies are read from the node's trio clock through :attr:`Metrics.now` (the clock's own
method, a third of the cost of ``trio.current_time()``). prometheus_client
renders them only when ``/metrics`` is scraped, through a custom collector registered in
the node's own :class:`prometheus_client.CollectorRegistry` (never the library's global
one: two nodes in one process keep their figures apart), next to prometheus_client's
process collector (CPU, memory, open files).

Names are in base units (seconds, bytes) and counters end in ``_total``; no label carries a
user id. docs/operations.md lists every metric.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from chatd.protocol import CLIENT_FRAMES, FRAMES, SERVER_FRAMES, ErrorCode, Frame

__all__ = ["GC_PAUSE_BUCKETS", "LATENCY_BUCKETS", "Histogram", "Metrics"]

#: Latency histogram bucket bounds, in seconds: fine around the 5 ms objective.
LATENCY_BUCKETS: tuple[float, ...] = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005,
                                      0.0075, 0.01, 0.025, 0.1, 1.0)
#: Garbage-collector pause bucket bounds, in seconds (a young collection takes tens of µs).
GC_PAUSE_BUCKETS: tuple[float, ...] = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                       0.005, 0.01, 0.025, 0.1, 0.25, 1.0)


class Histogram:
    """Counts of observations per bucket, and their sum.

    Args:
        bounds: The buckets' upper bounds, increasing; a last ``+Inf`` bucket is implied.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (a bound is inclusive, as in Prometheus)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, value: float, times: int) -> None:
        """Count ``times`` observations of the same value."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    @property
    def count(self) -> int:
        """How many observations were made."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus exposes them: (``le``, observations at most ``le``)."""
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class Metrics:
    """The figures one node keeps, and the registry that exports them.

    The attributes are bumped directly by the code that sees the events (sessions, the
    router); :meth:`gauge` and :meth:`collect` add figures read at scrape time from whoever
    knows them.

    Args:
        node: The node's name (Prometheus adds the scraped ``instance`` itself).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        #: Reads the node's clock (trio's; :meth:`use_current_clock` makes it a third as
        #: costly): the latencies, and the sessions' readers, read it.
        self.now: Callable[[], float] = trio.current_time
        #: Client frames acted on, indexed by ``Frame.INDEX``.
        self.frames_in = [0] * len(FRAMES)
        #: Frames sent to clients, indexed by ``Frame.INDEX``.
        self.frames_out = [0] * len(FRAMES)
        #: ``error`` frames sent to clients, by error code.
        self.errors = dict.fromkeys((code.value for code in ErrorCode), 0)
        #: New messages accepted (answered ``sent`` without ``dup``).
        self.messages_sent = 0
        #: Messages whose ``delivered`` receipt was produced.
        self.messages_delivered = 0
        #: Messages whose ``read`` receipt was produced.
        self.messages_read = 0
        #: Sessions closed as slow consumers.
        self.slow_consumers = 0
        #: Times a connection's reading was paused for its flood budget.
        self.rate_limited = 0
        #: Hop 1: from a client message read to the ``sent`` answer of a send in it.
        self.send_latency = Histogram()
        #: Hop 2: from a message stored to its ``msg`` written to the recipient's socket.
        self.delivery_latency = Histogram()
        #: Hop 3: from a ``msg`` written to the client message acknowledging it being read.
        self.ack_latency = Histogram()
        #: Sends answered ``store_unavailable``: nothing was stored (a server failure).
        self.send_failures = 0
        #: Garbage-collector pauses of this process, by generation (while :meth:`watch_gc`).
        self.gc_pauses = tuple(Histogram(GC_PAUSE_BUCKETS) for _ in range(3))
        self._gc_started = 0.0
        self._gauges: list[tuple[str, str, Callable[[], Sequence[tuple[dict[str, str],
                                                                      float]]]]] = []
        self._collectors: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def use_current_clock(self) -> None:
        """Read the running trio clock directly from now on (call inside the node's run)."""
        self.now = trio.lowlevel.current_clock().current_time

    @contextmanager
    def watch_gc(self) -> Iterator[None]:
        """Time every garbage collection of this process while the block runs."""
        gc.callbacks.append(self._on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses[info["generation"]].observe(time.perf_counter() - self._gc_started)

    def gauge(self, name: str, documentation: str,
              read: Callable[[], Sequence[tuple[dict[str, str], float]]]) -> None:
        """Export a gauge whose samples ``read`` returns at each scrape.

        Args:
            name: The metric's name (``chatd_...``).
            documentation: Its help text.
            read: Returns (labels, value) pairs.
        """
        self._gauges.append((name, documentation, read))

    def collect(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Export the metric families ``read`` builds at each scrape (a backend's figures).

        Args:
            read: Returns prometheus_client metric families.
        """
        self._collectors.append(read)

    def exposition(self) -> bytes:
        """Everything, in the Prometheus text format."""
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        """The metric families of the chatd figures (the process collector's aside)."""
        yield _by_type("chatd_frames_received_total", "Client frames acted on, by type.",
                       CLIENT_FRAMES.values(), self.frames_in)
        yield _by_type("chatd_frames_sent_total", "Frames sent to clients, by type.",
                       SERVER_FRAMES.values(), self.frames_out)
        errors = CounterMetricFamily("chatd_errors", "Error frames sent to clients, by code.",
                                     labels=["code"])
        for code in sorted(self.errors):
            errors.add_metric([code], self.errors[code])
        yield errors
        messages = CounterMetricFamily(
            "chatd_messages", "Messages accepted (sent) and acknowledged by their "
            "recipients (delivered, read).", labels=["status"])
        messages.add_metric(["sent"], self.messages_sent)
        messages.add_metric(["delivered"], self.messages_delivered)
        messages.add_metric(["read"], self.messages_read)
        yield messages
        yield CounterMetricFamily("chatd_send_failures",
                                  "Sends answered store_unavailable (nothing was stored).",
                                  value=self.send_failures)
        yield CounterMetricFamily("chatd_slow_consumers",
                                  "Sessions closed because they read too slowly.",
                                  value=self.slow_consumers)
        yield CounterMetricFamily("chatd_rate_limited",
                                  "Times a connection's reading was paused for its flood "
                                  "budget.", value=self.rate_limited)
        for name, documentation, histogram in (
                ("chatd_send_latency_seconds",
                 "Hop 1: from a client message read to the sent answer of a send in it.",
                 self.send_latency),
                ("chatd_delivery_latency_seconds",
                 "Hop 2: from a message stored to its msg written to the recipient.",
                 self.delivery_latency),
                ("chatd_ack_latency_seconds",
                 "Hop 3: from a msg written to the client's acknowledgement of it read.",
                 self.ack_latency)):
            hops = HistogramMetricFamily(name, documentation)
            hops.add_metric([], histogram.cumulative(), histogram.total)
            yield hops
        pauses = HistogramMetricFamily("chatd_gc_pause_seconds",
                                       "Garbage-collector pauses of the process.",
                                       labels=["generation"])
        for generation, histogram in enumerate(self.gc_pauses):
            pauses.add_metric([str(generation)], histogram.cumulative(), histogram.total)
        yield pauses
        for collect in self._collectors:
            yield from collect()
        for name, documentation, read in self._gauges:
            samples = read()
            family = GaugeMetricFamily(name, documentation,
                                       labels=sorted(samples[0][0]) if samples else None)
            for labels, value in samples:
                family.add_metric([labels[key] for key in sorted(labels)], value)
            yield family


def _by_type(name: str, documentation: str, frames: Iterable[type[Frame]],
             counts: Sequence[int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name.removesuffix("_total"), documentation, labels=["type"])
    for cls in sorted(frames, key=lambda cls: cls.TYPE):
        family.add_metric([cls.TYPE], counts[cls.INDEX])
    return family


class _Collector(Collector):
    """Hands a :class:`Metrics` object's families to prometheus_client at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()
