"""Where a node's link events and frames go: the registry, the replicas, the sessions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from chatd.logs import EventLog
from chatd.presence import PresenceService
from chatd.registry import Registry
from chatd.store import Entry

from .merge import unpack_entry
from .replicas import Replicas

__all__ = ["NodeLinks"]

logger = logging.getLogger(__name__)


class NodeLinks:
    """The node's :class:`chatd.cluster.link.LinkHandler`.

    Frames ``q`` and ``r`` (replica requests and answers) go to the replicas, ``dl`` (an
    entry for a session on this node) to the router, ``pr`` and ``prsync`` to presence, the
    rest (``reg``, ``unreg``, ``sync``) to the registry. Membership changes go to all three.

    Args:
        node: This node's name.
        registry: The node's registry.
        presence: The node's presence service.
        replicas: The node's replicated store.
        deliver: Offers an entry to a local session of a user.
    """

    def __init__(self, node: str, registry: Registry, presence: PresenceService,
                 replicas: Replicas, deliver: Callable[[str, Entry], None]) -> None:
        self._registry = registry
        self._presence = presence
        self._replicas = replicas
        self._deliver = deliver
        self._log = EventLog(logger, node, "cluster")

    async def peer_up(self, peer: str) -> None:
        """A link came up: the registry syncs, the replicas hand queues over."""
        self._replicas.peer_changed(peer, True)
        await self._registry.peer_up(peer)
        await self._presence.peer_up(peer)

    async def peer_down(self, peer: str) -> None:
        """A peer went down: its sessions are forgotten, requests to it fail over."""
        self._replicas.peer_changed(peer, False)
        await self._registry.peer_down(peer)
        await self._presence.peer_down(peer)

    async def remote(self, peer: str, frame: dict[str, Any]) -> None:
        """A frame from ``peer``."""
        kind = frame.get("t")
        if kind in ("q", "r"):
            await self._replicas.remote(peer, frame)
        elif kind in ("pr", "prsync"):
            await self._presence.remote(peer, frame)
        elif kind == "dl":
            try:
                user = str(frame["u"])
                entry = unpack_entry(user, frame["e"])
            except (KeyError, TypeError, ValueError):
                self._log.warning("link_frame_refused", peer=peer, frame="dl")
                return
            self._deliver(user, entry)
        else:
            await self._registry.remote(peer, frame)
