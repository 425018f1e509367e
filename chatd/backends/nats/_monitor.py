"""What the NATS engine tells /metrics, and its replica alarm.

- The publishes of messages, counted where they are made (:class:`~._jetstream.PublishStats`),
  become ``chatd_nats_publish_seconds`` and ``chatd_nats_publish_errors_total``
  (:func:`publish_families`).
- The queue stream's backlog and the state of its replicas come from the stream's info,
  which only NATS knows; ``/metrics`` is rendered synchronously at scrape time, so
  :class:`StreamWatch` reads the info every ``interval`` seconds and keeps the figures. When
  NATS does not answer, the last figures stay, and nothing is logged (the connection's own
  records say why).

A replica of the queue stream is *unreadable* when the stream's info lists it offline or
not current (behind its leader) at every reading for :data:`BEHIND_INTERVALS` intervals
(30 s by default). One reading is not enough: a replica busy under load is behind for a
moment at times, and one restarted on purpose (a rolling upgrade) is offline for a few
seconds. While a replica looks behind, the stream is read every ``interval /``
:data:`CONFIRM_PACE` seconds, until it is current again or has been behind throughout. (A
follower that died shows as behind as soon as the stream is written to, or after about ten
seconds; one that was the leader, at once under the new leader.) Then some queues cannot be
read from every replica: ``replica_unreadable`` is logged once, and cleared
(``replica_unreadable_cleared``) at the first reading that finds every replica online and
current. A stream of one replica never raises it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from chatd.backends._records import StoreUnavailable
from chatd.logs import EventLog

from ._jetstream import PUBLISH_ERRORS, JetStream, JetStreamError, PublishStats

__all__ = ["MONITOR_INTERVAL", "StreamWatch", "publish_families"]

logger = logging.getLogger(__name__)

#: Seconds between two readings of the queue stream's info.
MONITOR_INTERVAL = 10.0
#: Intervals a replica must look behind (or offline) throughout to be unreadable.
BEHIND_INTERVALS = 3
#: While a replica looks behind, the stream is read this many times more often.
CONFIRM_PACE = 10


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


class StreamWatch:
    """Reads a stream's info every ``interval`` seconds: its size, and its replicas.

    Args:
        jetstream: The JetStream API over the node's connection.
        stream: The stream's name (the queues').
        log: Where the replica alarm is logged.
        interval: Seconds between readings.
    """

    def __init__(self, jetstream: JetStream, stream: str, log: EventLog, *,
                 interval: float = MONITOR_INTERVAL) -> None:
        self._js = jetstream
        self._stream = stream
        self._log = log
        self.interval = interval
        #: The stream's messages and bytes at the last reading; None before the first.
        self.backlog: tuple[int, int] | None = None
        #: The replicas found unreadable when the alarm was raised; empty while it is not.
        self.unreadable: tuple[str, ...] = ()
        self._behind: dict[str, float] = {}  # replica -> since when it has looked behind

    @property
    def raised(self) -> bool:
        """Whether the ``replica_unreadable`` alarm is raised."""
        return bool(self.unreadable)

    async def run(self) -> None:
        """Read the stream's info now and every ``interval`` seconds (forever)."""
        while True:
            await self.check()
            await trio.sleep(self.interval / CONFIRM_PACE if self._behind and not self.raised
                             else self.interval)

    async def check(self) -> None:
        """Read the stream's info once, and raise or clear the alarm by it. When NATS does
        not answer (or the stream is gone), everything stays as it was."""
        try:
            info = await self._js.api(f"STREAM.INFO.{self._stream}")
        except (StoreUnavailable, JetStreamError):
            return
        state = info.get("state", {})
        self.backlog = (int(state.get("messages", 0)), int(state.get("bytes", 0)))
        self._judge(info.get("cluster", {}).get("replicas", []))

    def _judge(self, replicas: Sequence[dict[str, Any]]) -> None:
        now = trio.current_time()
        behind = {str(r.get("name") or r.get("peer")) for r in replicas
                  if r.get("offline") or not r.get("current")}
        self._behind = {name: self._behind.get(name, now) for name in behind}
        unreadable = sorted(name for name, since in self._behind.items()
                            if now - since >= BEHIND_INTERVALS * self.interval)
        if unreadable and not self.raised:
            self.unreadable = tuple(unreadable)
            self._log.error("replica_unreadable", error="replica_unreadable",
                            stream=self._stream, unreadable=unreadable)
        elif not behind and self.raised:
            self.unreadable = ()
            self._log.info("replica_unreadable_cleared", stream=self._stream)
