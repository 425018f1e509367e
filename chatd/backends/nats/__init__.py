"""The NATS engine: several processes and machines on NATS JetStream.

- queues: one file-backed stream (:mod:`._queues`);
- state: one JetStream key-value bucket per declared bucket (:mod:`._state`);
- blobs: the JetStream object store (:mod:`._blobs`);
- bus: core NATS subjects (:mod:`._bus`).

Streams and buckets are created (or brought to chatd's configuration) when the backend
starts, with ``nats_replicas`` replicas (by default 3 on a cluster of three or more
servers, 1 on a single server). The servers themselves must run JetStream with
``sync_interval: always`` (``chatd nats-config`` prints such a configuration,
:mod:`chatd.backends.nats.server`). nats-py runs under trio in :mod:`._bridge`, the only
module of chatd that touches asyncio.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NatsBackend"]


def __getattr__(name: str) -> Any:
    """Import the engine (and nats-py) only when it is used: :mod:`.server` does not need
    it, and ``chatd nats-config`` works without the ``nats`` extra."""
    if name == "NatsBackend":
        from ._backend import NatsBackend

        return NatsBackend
    raise AttributeError(name)
