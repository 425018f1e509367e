"""The cluster: nodes that link to each other over TCP and keep each queue on two of them.

- :mod:`chatd.cluster._wire`, sans-IO: length-prefixed CBOR frames and the handshake by
  which two nodes prove to each other that they hold the cluster's secret;
- :mod:`chatd.cluster.link`: one supervised link actor per peer, heartbeats, failure
  detection and membership;
- :mod:`chatd.cluster.placement`: which two nodes keep a user's queue (rendezvous
  hashing) and which of them leads it;
- :mod:`chatd.cluster.replicas` and :mod:`chatd.cluster.merge`: the replicated store, and
  how two replicas of a queue are merged after a failure;
- :mod:`chatd.cluster.calls`: requests between nodes and their answers;
- :mod:`chatd.cluster.handoff` and :mod:`chatd.cluster.gates`: bringing a queue's copies
  together after a membership change, without interleaving with writes to it;
- :mod:`chatd.cluster.dispatch`: where link frames go.

The registry across nodes is :mod:`chatd.registry`; cross-node delivery is the router's.
"""

from ._wire import (
    LINK_VERSION,
    MAX_LINK_FRAME,
    FrameDecoder,
    Handshake,
    LinkError,
    encode_frame,
    link_key,
)
from .dispatch import NodeLinks
from .link import Cluster, Membership
from .merge import merge_states, pack_entry, unpack_entry
from .placement import Placement, ranking
from .replicas import Replicas

__all__ = [
    "LINK_VERSION",
    "MAX_LINK_FRAME",
    "Cluster",
    "FrameDecoder",
    "Handshake",
    "LinkError",
    "Membership",
    "NodeLinks",
    "Placement",
    "Replicas",
    "encode_frame",
    "link_key",
    "merge_states",
    "pack_entry",
    "ranking",
    "unpack_entry",
]
