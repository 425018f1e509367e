"""The NATS engine as one backend: connect, prepare the streams and buckets, serve."""

from __future__ import annotations

import functools
import logging
import math

import trio

from chatd.actors import ActorTable
from chatd.backends._interfaces import Blobs, Bus, Queues, State
from chatd.backends._records import BackendUnavailable, StoreUnavailable
from chatd.config import Config
from chatd.logs import EventLog
from chatd.metrics import Metrics

from ._blobs import NatsBlobs
from ._bridge import NatsBridge
from ._bus import NatsBus
from ._jetstream import JetStream, JetStreamError
from ._monitor import MONITOR_INTERVAL, StreamWatch, publish_families
from ._names import Names
from ._queues import NatsQueues
from ._state import NatsState, bucket_stream

__all__ = ["NatsBackend", "queue_stream"]

logger = logging.getLogger(__name__)

#: At start, how many times ``nats_timeout`` the streams may take to be ready (a cluster
#: that has just started elects its JetStream leader first).
PREPARE_ATTEMPTS = 3


def queue_stream(names: Names, replicas: int, dedup_window: float) -> dict[str, object]:
    """The configuration of the stream of queues."""
    return {"name": names.stream, "subjects": names.stream_subjects(),
            "description": "chatd: queues, acknowledgement records, remembered ids",
            "retention": "limits", "storage": "file", "num_replicas": replicas,
            "discard": "old", "duplicate_window": int(dedup_window * 1e9),
            "allow_direct": True, "allow_rollup_hdrs": True, "allow_msg_ttl": True,
            "republish": names.republish()}


class NatsBackend:
    """The NATS engine as one :class:`chatd.backends.Backend`.

    Args:
        config: ``nats`` URLs and the other ``nats_*`` settings.
        actors: The node's actor table (for the node's name in logs).
        monitor_interval: Seconds between two readings of the queue stream's info (its
            backlog, and whether every replica can be read).
    """

    engine = "nats"

    def __init__(self, config: Config, actors: ActorTable, *,
                 monitor_interval: float = MONITOR_INTERVAL) -> None:
        self._config = config
        self._log = EventLog(logger, actors.node, "backend")
        self.names = Names(config.nats_namespace)
        self.bridge = NatsBridge(config, self._log)
        self.jetstream = JetStream(self.bridge)
        self.nats_queues = NatsQueues(self.jetstream, self.names,
                                      dedup_window=config.dedup_window,
                                      max_unread=config.max_unread, log=self._log)
        self.nats_state = NatsState(self.jetstream, self.names)
        self.queues: Queues = self.nats_queues
        self.state: State = self.nats_state
        self.blobs: Blobs = NatsBlobs(self.bridge, self.names)
        self.nats_bus = NatsBus(self.bridge, self.names, self._log, self.nats_queues.note)
        self.bus: Bus = self.nats_bus
        self.watch = StreamWatch(self.jetstream, self.names.stream, self._log,
                                 interval=monitor_interval)
        self._reconnected = trio.Event()
        self.bridge.on_reconnect = self._reconnected.set
        #: Replicas of the streams and buckets, once the backend runs.
        self.replicas = 0

    def export(self, metrics: Metrics) -> None:
        """The publishes of messages (latency, failures by reason), the queue stream's
        backlog, and the replica alarm (docs/operations.md lists them)."""
        watch = self.watch
        metrics.collect(functools.partial(publish_families, self.nats_queues.publishes))
        metrics.gauge("chatd_queue_backlog_items",
                      "Messages in the queue stream (all nodes'), at the last reading.",
                      lambda: [] if watch.backlog is None else [({}, watch.backlog[0])])
        metrics.gauge("chatd_queue_backlog_bytes",
                      "Bytes of the queue stream (all nodes'), at the last reading.",
                      lambda: [] if watch.backlog is None else [({}, watch.backlog[1])])
        metrics.gauge("chatd_replica_unreadable",
                      "1 while a replica of the queue stream cannot be read, else 0.",
                      lambda: [({}, 1.0 if watch.raised else 0.0)])

    def unready(self) -> tuple[str, str] | None:
        """NATS accepts writes while the connection is up (JetStream answers each one)."""
        if not self.bridge.connected:
            return "nats", "not connected to NATS"
        return None

    async def run(self, *, task_status: trio.TaskStatus[NatsBackend] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """Connect, create or update the streams and buckets, then serve.

        Raises:
            BackendUnavailable: NATS cannot be reached, refused the credentials, or has no
                JetStream.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bridge.run)
            # A cluster that has just started may still be electing its JetStream leader.
            failure = await self._prepare_within(PREPARE_ATTEMPTS * self._config.nats_timeout)
            if failure is not None:
                raise BackendUnavailable(f"NATS JetStream is not usable: {failure}")
            nursery.start_soon(self.nats_queues.retry)
            nursery.start_soon(self._after_reconnects)
            nursery.start_soon(self.watch.run)
            task_status.started(self)

    async def _after_reconnects(self) -> None:
        """After each reconnection: make sure the streams and buckets exist again (a
        server restarted alone loses the buckets kept in memory), then tell the node that
        live traffic may have been lost."""
        while True:
            await self._reconnected.wait()
            self._reconnected = trio.Event()
            self.bridge.on_reconnect = self._reconnected.set
            await self._prepare_within(math.inf)
            self.nats_bus.lost()

    async def _prepare_within(self, seconds: float) -> str | None:
        """Prepare the streams and buckets, trying again with a growing pause for up to
        ``seconds``; None once done, else the last failure."""
        delay = 0.1
        failure = None
        with trio.move_on_after(seconds):
            while True:
                try:
                    await self._prepare()
                    return None
                except (StoreUnavailable, JetStreamError) as exc:
                    failure = str(exc)
                    self._log.warning("nats_not_ready", reason=failure)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        return failure

    async def _prepare(self) -> None:
        config, names = self._config, self.names
        largest = config.limits.max_frame_bytes
        if self.bridge.max_payload < largest:
            raise BackendUnavailable(
                f"the NATS server takes messages of at most {self.bridge.max_payload} bytes "
                f"(max_payload), less than limits.max_frame_bytes ({largest})")
        self.replicas = config.nats_replicas or (3 if self.bridge.cluster_size >= 3 else 1)
        # Chosen by chatd (nats_replicas = 0), the replicas of a stream that exists stay as
        # they are: a node that knows fewer servers must not scale a stream down.
        keep = () if config.nats_replicas else ("num_replicas",)
        self.nats_state.frozen = True
        streams = [queue_stream(names, self.replicas, config.dedup_window)]
        streams += [bucket_stream(names, bucket.spec, self.replicas)
                    for bucket in self.nats_state.buckets.values()]
        for stream in streams:
            outcome = await self.jetstream.ensure_stream(stream, keep=keep)
            if outcome != "unchanged":
                self._log.info(f"nats_stream_{outcome}", stream=stream["name"],
                               replicas=self.replicas)
        await self.bridge.ensure_object_store(names.objects, self.replicas)
