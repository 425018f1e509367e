"""The cluster: nodes that link to each other over TCP (issue #6, in progress).

Built so far: the link protocol, sans-IO (:mod:`chatd.cluster._wire`): length-prefixed
CBOR frames and the handshake by which two nodes prove to each other that they hold the
cluster's secret; and the links themselves (:mod:`chatd.cluster.link`): one supervised link
actor per peer, heartbeats, failure detection and membership. The registry across nodes
and cross-node routing build on them.
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
from .link import Cluster, Membership

__all__ = [
    "LINK_VERSION",
    "MAX_LINK_FRAME",
    "Cluster",
    "FrameDecoder",
    "Handshake",
    "LinkError",
    "Membership",
    "encode_frame",
    "link_key",
]
