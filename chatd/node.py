"""A node: the root of one process's supervision tree, and its graceful shutdown.

::

    node supervisor (one_for_one, restart intensity from the config)
     ├─ registry   permanent   user -> session address
     ├─ store      permanent   the persistence actor
     ├─ presence   permanent   last seen, online state, subscriptions
     ├─ cluster    permanent   links to peer nodes        ┐ only in a cluster
     ├─ replicas   permanent   queues on two nodes        ┘ (cluster_listen set)
     └─ listener   permanent   WebSocket accept loop
          └─ sessions          temporary, one per connection

Children start in that order, each after the previous one reported it was ready, so the
listener accepts nobody before the services it needs are up. Everything a node owns hangs
off the :class:`Node` object, so two nodes can run in one process.

Shutdown, once requested, goes in layers with deadlines: stop accepting; ask every
session to close with 1001 and wait up to ``shutdown_timeout``; then cancel the tree.
"""

from __future__ import annotations

import logging

import trio

from chatd.actors import ActorTable, ChildSpec, Restart, Supervisor
from chatd.auth import load_or_create_secret
from chatd.cluster import Cluster, NodeLinks, Replicas, link_key, pack_entry
from chatd.config import Config
from chatd.listener import Listener
from chatd.logs import EventLog
from chatd.presence import PresenceService
from chatd.registry import Registry
from chatd.router import Router
from chatd.session import SessionContext
from chatd.store import DurableStore, MemoryStore, Store

__all__ = ["Node"]

logger = logging.getLogger(__name__)


class Node:
    """One chatd node.

    Args:
        config: The node's configuration.
        store: The store to use; defaults to the one ``config.store`` names (durable or
            memory), sized by ``config``.
    """

    def __init__(self, config: Config, *, store: Store | None = None) -> None:
        self.config = config
        self.actors = ActorTable(config.node)
        self.registry = Registry(self.actors)
        self.presence = PresenceService(self.actors, threshold=config.online_threshold)
        self.store: Store = store or _make_store(config, self.actors)
        #: The node's links to its peers, and the queues replicated over them (in a cluster).
        self.cluster: Cluster | None = None
        self.replicas: Replicas | None = None
        if config.cluster_listen is not None:
            cluster = self.cluster = Cluster(config, b"")
            assert isinstance(self.store, (DurableStore, MemoryStore))
            self.replicas = Replicas(
                config.node, list(config.peers), self.store, cluster.send,
                cluster.membership.is_up,
                timeout=config.failure_timeout + config.heartbeat_interval,
                settle=config.failure_timeout)
            self.router = Router(self.actors, self.registry, self.replicas,
                                 forward=lambda node, user, entry: cluster.send(
                                     node, {"t": "dl", "u": user, "e": pack_entry(entry)}))
            self.replicas.offer = self.router.offer
            self.replicas.locate = self.registry.table.__contains__
            cluster.handler = NodeLinks(
                config.node, self.registry, self.presence, self.replicas,
                lambda user, entry: self.router.offer(user, entry, forward=False))
            self.registry.attach(cluster.send)
            self.presence.attach(cluster.send)
        else:
            self.router = Router(self.actors, self.registry, self.store)
        self.supervisor = Supervisor("node", node=config.node,
                                     intensity=config.restart_intensity,
                                     period=config.restart_period)
        self.listener: Listener | None = None
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

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the tree, report ready, serve until shutdown is requested, then stop.

        Raises:
            RestartIntensityExceeded: A child of the node crashed too often (in an
                exception group).
            OSError: The secret or the listening socket could not be set up.
        """
        config = self.config
        secret = load_or_create_secret(config.secret_path)
        ctx = SessionContext(config, secret, self.actors, self.registry, self.presence,
                             self.router, self.replicas or self.store)
        listener = self.listener = Listener(ctx)
        children = [
            ChildSpec("registry", self.registry.run, Restart.PERMANENT),
            ChildSpec("store", self.store.run, Restart.PERMANENT),
            ChildSpec("presence", self.presence.run, Restart.PERMANENT),
            ChildSpec("listener", listener.run, Restart.PERMANENT),
        ]
        if self.cluster is not None and self.replicas is not None:
            self.cluster.key = link_key(secret)
            children[3:3] = [ChildSpec("cluster", self.cluster.run, Restart.PERMANENT),
                             ChildSpec("replicas", self.replicas.run, Restart.PERMANENT)]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run, children)
            task_status.started(self)
            await self._shutdown.wait()
            self._log.info("shutting_down", sessions=listener.live_sessions)
            listener.stop_accepting()
            drained = await listener.drain(config.shutdown_timeout)
            if not drained:
                self._log.warning("shutdown_deadline", sessions=listener.live_sessions)
            nursery.cancel_scope.cancel()
        self._log.info("stopped")


def _make_store(config: Config, actors: ActorTable) -> Store:
    """The store the configuration asks for."""
    if config.store == "memory":
        return MemoryStore(dedup_window=config.dedup_window, dedup_max=config.dedup_max_ids,
                           max_unread=config.max_unread)
    return DurableStore(actors, config.replica_paths, segment_bytes=config.segment_bytes,
                        checkpoint_interval=config.checkpoint_interval,
                        dedup_window=config.dedup_window, dedup_max=config.dedup_max_ids,
                        max_unread=config.max_unread)
