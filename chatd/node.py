"""A node: the root of one process's supervision tree, and its graceful shutdown.

::

    node supervisor (one_for_one, restart intensity from the config)
     ├─ backend    permanent   queues, state, blobs, bus: embedded files or NATS JetStream
     ├─ registry   permanent   user -> local session; releases claims of ended sessions
     ├─ presence   permanent   last seen, online state, subscriptions
     ├─ slo        permanent   burn-rate alarms on the send objectives
     ├─ http       permanent   health, readiness, metrics (unless http_listen is "")
     └─ listener   permanent   WebSocket accept loop
          └─ sessions          temporary, one per connection

Children start in that order, each after the previous one reported it was ready, so the
listener accepts nobody before the services it needs are up. Everything a node owns hangs
off the :class:`Node` object, so two nodes can run in one process.

Shutdown, once requested, goes in layers with deadlines: stop accepting; ask every
session to close with 1001 and wait up to ``shutdown_timeout``; let presence write the
last seen of the sessions that closed (up to ``FLUSH_TIMEOUT``); then cancel the tree.
"""

from __future__ import annotations

import logging

import trio

from chatd.actors import ActorTable, ChildSpec, Restart, Supervisor
from chatd.auth import load_or_create_secret
from chatd.backends import Backend, open_backend
from chatd.config import Config
from chatd.http import HttpFront
from chatd.listener import Listener
from chatd.logs import EventLog
from chatd.messages import Resync
from chatd.metrics import Metrics
from chatd.presence import PresenceService
from chatd.registry import Registry
from chatd.router import Router
from chatd.session import SessionContext
from chatd.slo import SloMonitor

__all__ = ["FLUSH_TIMEOUT", "Node"]

logger = logging.getLogger(__name__)

#: Seconds shutdown waits for presence to write the last seen of the sessions it closed.
FLUSH_TIMEOUT = 2.0


class Node:
    """One chatd node.

    Args:
        config: The node's configuration.
        backend: The backend to use; defaults to the one the configuration names (NATS
            with ``nats`` URLs, else embedded with ``config.store``).

    Raises:
        BackendUnavailable: The configured backend cannot be used (its extra is missing).
    """

    def __init__(self, config: Config, *, backend: Backend | None = None) -> None:
        self.config = config
        self.metrics = Metrics(config.node)
        self.actors = ActorTable(config.node)
        self.backend = backend or open_backend(config, self.actors)
        self.registry = Registry(self.actors, self.backend.state, self.backend.bus)
        self.presence = PresenceService(self.actors, self.backend.state, self.backend.bus,
                                        threshold=config.online_threshold,
                                        last_seen_ttl=config.last_seen_ttl)
        self.router = Router(self.actors, self.registry, self.backend.queues,
                             self.backend.bus, self.metrics)
        self.slo = SloMonitor(config, self.metrics)
        self.backend.bus.bind(deliver=self.router.deliver, signal=self.registry.signal,
                              presence=self.presence.heard, lost=self._resync)
        self.supervisor = Supervisor("node", node=config.node,
                                     intensity=config.restart_intensity,
                                     period=config.restart_period)
        self.listener: Listener | None = None
        self.http: HttpFront | None = None
        self._log = EventLog(logger, config.node, "node")
        self._shutdown = trio.Event()

    @property
    def url(self) -> str:
        """The WebSocket URL the node listens on (with the real port)."""
        return self.listener.url if self.listener else ""

    @property
    def shutdown_requested(self) -> bool:
        """Whether a graceful shutdown has been asked for."""
        return self._shutdown.is_set()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`run` returns when it is complete."""
        self._shutdown.set()

    def _resync(self) -> None:
        """The bus may have lost entries: every local session reads its queue again."""
        self._log.warning("bus_resync", sessions=len(self.registry.local))
        for address in list(self.registry.local.values()):
            mailbox = self.actors.lookup(address)
            if mailbox is not None:
                mailbox.deliver_nowait(Resync())

    def _export(self, listener: Listener) -> None:
        """Export the figures read at scrape time: connections, sessions, readiness."""
        metrics = self.metrics
        self.backend.export(metrics)
        metrics.gauge("chatd_connections", "WebSocket connections served, by state.",
                      lambda: [({"state": "authenticating"}, listener.authenticating),
                               ({"state": "open"},
                                listener.live_sessions - listener.authenticating)])
        metrics.gauge("chatd_sessions", "Sessions of users on this node.",
                      lambda: [({}, len(self.registry.local))])
        metrics.gauge("chatd_ready", "1 when the backend accepts writes (/readyz), else 0.",
                      lambda: [({}, 0.0 if self.backend.unready() else 1.0)])

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the tree, report ready, serve until shutdown is requested, then stop.

        Raises:
            RestartIntensityExceeded: A child of the node crashed too often (in an
                exception group).
            BackendUnavailable: The backend could not start (in an exception group).
            OSError: The secret or the listening socket could not be set up.
        """
        config = self.config
        secret = load_or_create_secret(config.secret_path)
        ctx = SessionContext(config, secret, self.actors, self.registry, self.presence,
                             self.router, self.backend.queues, self.metrics)
        listener = self.listener = Listener(ctx)
        self._export(listener)
        children = [
            ChildSpec("backend", self.backend.run, Restart.PERMANENT),
            ChildSpec("registry", self.registry.run, Restart.PERMANENT),
            ChildSpec("presence", self.presence.run, Restart.PERMANENT),
            ChildSpec("slo", self.slo.run, Restart.PERMANENT),
        ]
        if config.http_listen:
            self.http = HttpFront(config, self.metrics, self.backend.unready)
            children.append(ChildSpec("http", self.http.run, Restart.PERMANENT))
        children.append(ChildSpec("listener", listener.run, Restart.PERMANENT))
        self.metrics.use_current_clock()
        with self.metrics.watch_gc():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.supervisor.run, children)
                task_status.started(self)
                await self._shutdown.wait()
                self._log.info("shutting_down", sessions=listener.live_sessions)
                listener.stop_accepting()
                drained = await listener.drain(config.shutdown_timeout)
                if not drained:
                    self._log.warning("shutdown_deadline", sessions=listener.live_sessions)
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await self.presence.flush()  # last seen of the sessions just closed
                nursery.cancel_scope.cancel()
        self._log.info("stopped")
