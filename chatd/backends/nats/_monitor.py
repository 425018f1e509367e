"""What the NATS engine tells /metrics: the publishes of messages, counted where they are
made (:class:`~._jetstream.PublishStats`), as ``chatd_nats_publish_seconds`` and
``chatd_nats_publish_errors_total``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from ._jetstream import PUBLISH_ERRORS, PublishStats

__all__ = ["publish_families"]


def publish_families(stats: PublishStats) -> Iterator[Metric]:
    """The publishes of messages as metric families."""
    seconds = HistogramMetricFamily(
        "chatd_nats_publish_seconds",
        "From a message's JetStream publish being sent to its acknowledgement arriving.")
    seconds.add_metric([], stats.seconds.cumulative(), stats.seconds.total)
    yield seconds
    errors = CounterMetricFamily("chatd_nats_publish_errors",
                                 "JetStream publishes of messages that failed, by reason.",
                                 labels=["reason"])
    for reason in PUBLISH_ERRORS:
        errors.add_metric([reason], stats.errors[reason])
    yield errors
