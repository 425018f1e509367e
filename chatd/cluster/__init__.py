"""The cluster: nodes that link to each other over TCP (issue #6, in progress).

Built so far: the link protocol, sans-IO (:mod:`chatd.cluster._wire`): length-prefixed
CBOR frames and the handshake by which two nodes prove to each other that they hold the
cluster's secret. Links, membership, the registry across nodes and cross-node routing
build on it.
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

__all__ = [
    "LINK_VERSION",
    "MAX_LINK_FRAME",
    "FrameDecoder",
    "Handshake",
    "LinkError",
    "encode_frame",
    "link_key",
]
