"""A node's metrics: plain counters on the hot path, Prometheus families at scrape time.

Counting a frame or a message must cost next to nothing on the routed-message path, so the
hot path only bumps Python integers and entries of plain dictionaries on a :class:`Metrics`
object (no locks, no label lookups; the dictionaries are filled with every frame type and
error code up front, since a ``collections.Counter`` costs 2.5 times as much per bump), and
:class:`Histogram` puts a latency in its bucket with one bisection. prometheus_client
renders them only when ``/metrics`` is scraped, through a custom collector registered in
the node's own :class:`prometheus_client.CollectorRegistry` (never the library's global
one: two nodes in one process keep their figures apart), next to prometheus_client's
process collector (CPU, memory, open files).

Names are in base units (seconds, bytes) and counters end in ``_total``; no label carries a
user id. docs/operations.md lists every metric.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from chatd.protocol import CLIENT_FRAMES, SERVER_FRAMES, AckStatus, ErrorCode

__all__ = ["LATENCY_BUCKETS", "Histogram", "Metrics"]

#: Latency histogram bucket bounds, in seconds: fine around the 5 ms objective.
LATENCY_BUCKETS: tuple[float, ...] = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005,
                                      0.0075, 0.01, 0.025, 0.1, 1.0)


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
    router); :meth:`gauge` adds figures read at scrape time from whoever knows them.

    Args:
        node: The node's name, a constant label of nothing (Prometheus adds ``instance``
            itself); kept for the collector's description.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        #: Client frames acted on, by frame type.
        self.frames_in = _zeros(CLIENT_FRAMES)
        #: Frames sent to clients, by frame type.
        self.frames_out = _zeros(SERVER_FRAMES)
        #: ``error`` frames sent to clients, by error code.
        self.errors = _zeros(code.value for code in ErrorCode)
        #: New messages accepted (answered ``sent`` without ``dup``).
        self.messages_sent = 0
        #: Messages acknowledged by their recipients, by status (delivered, read).
        self.messages_acked = _zeros(status.value for status in AckStatus)
        #: Sessions closed as slow consumers.
        self.slow_consumers = 0
        #: Times a connection's reading was paused for its flood budget.
        self.rate_limited = 0
        #: From a client message read to its ``sent`` answer, in seconds.
        self.send_latency = Histogram()
        #: Sends answered ``store_unavailable``: nothing was stored (a server failure).
        self.send_failures = 0
        self._gauges: list[tuple[str, str, Callable[[], Sequence[tuple[dict[str, str],
                                                                      float]]]]] = []
        self._collectors: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

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
        yield _counter("chatd_frames_received_total", "Client frames acted on, by type.",
                       "type", self.frames_in)
        yield _counter("chatd_frames_sent_total", "Frames sent to clients, by type.",
                       "type", self.frames_out)
        yield _counter("chatd_errors_total", "Error frames sent to clients, by code.",
                       "code", self.errors)
        messages = CounterMetricFamily(
            "chatd_messages", "Messages accepted (sent) and acknowledged by their "
            "recipients (delivered, read).", labels=["status"])
        messages.add_metric(["sent"], self.messages_sent)
        for status in ("delivered", "read"):
            messages.add_metric([status], self.messages_acked[status])
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
        latency = HistogramMetricFamily(
            "chatd_send_latency_seconds",
            "From a client message read to the sent answer of a message in it.")
        latency.add_metric([], self.send_latency.cumulative(), self.send_latency.total)
        yield latency
        for collect in self._collectors:
            yield from collect()
        for name, documentation, read in self._gauges:
            samples = read()
            family = GaugeMetricFamily(name, documentation,
                                       labels=sorted(samples[0][0]) if samples else None)
            for labels, value in samples:
                family.add_metric([labels[key] for key in sorted(labels)], value)
            yield family


def _zeros(keys: Iterable[str] | Mapping[str, object]) -> dict[str, int]:
    """A count of 0 for every key (a frame type, an error code, a status)."""
    return dict.fromkeys(keys, 0)


def _counter(name: str, documentation: str, label: str,
             counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name.removesuffix("_total"), documentation, labels=[label])
    for key in sorted(counts):
        family.add_metric([key], counts[key])
    return family


class _Collector(Collector):
    """Hands a :class:`Metrics` object's families to prometheus_client at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()
