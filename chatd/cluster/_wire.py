"""The link protocol between two nodes, sans-IO: framing and the mutual handshake.

A link is one TCP connection between two nodes. Each frame on it is a 4-byte big-endian
length followed by that many bytes of CBOR: a map whose ``"t"`` key names the frame's type.
:func:`encode_frame` builds one; :class:`FrameDecoder` turns received bytes into frames and
refuses a frame longer than its limit as soon as the length says so, before buffering it.

Before anything else, the two ends prove to each other that they hold the cluster's key
(:func:`link_key`, derived from the token secret every node of a cluster shares), without
sending it, by a challenge-response in three frames::

    dialer                                   acceptor
      hello {v, node, nonce: a}        ->
                                       <-    challenge {node, nonce: b, proof: P("accept")}
      auth {proof: P("dial")}          ->

where ``P(role)`` is HMAC-SHA256 over the role, both nonces and both node names. Each side
checks the other's proof (in constant time) before it trusts anything the other says; fresh
random nonces on both sides make a recorded exchange useless on a later link. A node also
checks that the peer is the node it meant to reach (dialer) or one it knows (acceptor).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import cbor2

__all__ = [
    "LINK_VERSION",
    "MAX_LINK_FRAME",
    "FrameDecoder",
    "Handshake",
    "LinkError",
    "encode_frame",
    "link_key",
]

#: The link protocol's version, sent in the dialer's hello.
LINK_VERSION = 1
#: The default limit on one link frame, in bytes of CBOR.
MAX_LINK_FRAME = 16 * 1024 * 1024

_LENGTH = 4
_NONCE_BYTES = 16


class LinkError(Exception):
    """The peer broke the link protocol or failed the handshake; drop the connection."""


def link_key(secret: bytes) -> bytes:
    """The key nodes authenticate links with, derived from the cluster's token secret.

    A separate key, so that nothing a link sends can be replayed as a token signature.
    """
    return hmac.new(secret, b"chatd cluster link key", hashlib.sha256).digest()


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """One frame: its CBOR encoding, prefixed with its length."""
    body = cbor2.dumps(dict(frame))
    return len(body).to_bytes(_LENGTH, "big") + body


class FrameDecoder:
    """Turns the bytes of a link into frames.

    Args:
        max_frame: The largest frame accepted, in bytes.
    """

    __slots__ = ("_buffer", "_max_frame", "backlog")

    def __init__(self, max_frame: int = MAX_LINK_FRAME) -> None:
        #: Frames decoded while the handshake finished, not yet handled (see
        #: :func:`chatd.cluster.link._shake`).
        self.backlog: list[dict[str, Any]] = []
        self._max_frame = max_frame
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return every frame they complete, in order.

        Raises:
            LinkError: A frame is too long, is not well-formed CBOR, or is not a map with a
                text ``"t"``.
        """
        buf = self._buffer + data if self._buffer else data
        pos, end = 0, len(buf)
        frames = []
        while end - pos >= _LENGTH:
            size = int.from_bytes(buf[pos:pos + _LENGTH], "big")
            if size > self._max_frame:
                raise LinkError(f"frame of {size} bytes exceeds {self._max_frame}")
            if end - pos - _LENGTH < size:
                break
            body = buf[pos + _LENGTH:pos + _LENGTH + size]
            pos += _LENGTH + size
            frames.append(_decode(body))
        self._buffer = buf[pos:]
        return frames


def _decode(body: bytes) -> dict[str, Any]:
    try:
        fp = io.BytesIO(body)
        frame = cbor2.CBORDecoder(fp, max_depth=16, allow_indefinite=False,
                                  tag_hook=_refuse_tag).decode()
        if fp.tell() != len(body):
            raise LinkError("bytes after the frame's CBOR item")
    except LinkError:
        raise
    except Exception as exc:
        raise LinkError(f"not well-formed CBOR: {type(exc).__name__}") from None
    if type(frame) is not dict or type(frame.get("t")) is not str:
        raise LinkError("a link frame is a map with a text 't'")
    return frame


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise LinkError("CBOR tags are not used on links")


class Handshake:
    """One end of the link handshake.

    Args:
        key: The cluster's link key (:func:`link_key`).
        node: This node's name.
        peer: For the dialer, the node it means to reach; ``None`` for the acceptor.
        known: For the acceptor, which node names it accepts links from.
        nonce: This side's nonce (a fresh random one by default; tests pass their own).

    Use :meth:`start` on the dialer for its first frame, then give every received frame to
    :meth:`receive`, which returns the frames to send back. :attr:`peer` is the other
    node's name, trustworthy once :attr:`done` is true.
    """

    __slots__ = ("_dialing", "_key", "_known", "_nonce", "_theirs", "done", "node", "peer")

    def __init__(self, key: bytes, node: str, *, peer: str | None = None,
                 known: Callable[[str], bool] | None = None, nonce: bytes | None = None
                 ) -> None:
        self._key = key
        self.node = node
        self.peer = peer
        self._dialing = peer is not None
        self._known = known or (lambda name: True)
        self._nonce = nonce or secrets.token_bytes(_NONCE_BYTES)
        self._theirs = b""
        self.done = False

    def start(self) -> dict[str, Any]:
        """The dialer's first frame."""
        assert self._dialing, "only the dialer starts"
        return {"t": "hello", "v": LINK_VERSION, "node": self.node, "nonce": self._nonce}

    def receive_all(self, frames: list[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Feed ``frames`` until the handshake is done.

        Returns:
            The frames to send back, and the frames that came after the handshake ended
            (the peer's first frames of the link).

        Raises:
            LinkError: As :meth:`receive`.
        """
        replies: list[dict[str, Any]] = []
        for at, frame in enumerate(frames):
            if self.done:
                return replies, frames[at:]
            replies.extend(self.receive(frame))
        return replies, []

    def receive(self, frame: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Take the peer's next handshake frame; return what to send in reply.

        Raises:
            LinkError: The frame is out of place or malformed, the versions differ, the
                peer is not who it should be, or its proof is wrong.
        """
        if self.done:
            raise LinkError("the handshake is over")
        kind = frame.get("t")
        if not self._dialing and kind == "hello" and not self._theirs:
            return [self._challenge(frame)]
        if self._dialing and kind == "challenge" and not self._theirs:
            return [self._auth(frame)]
        if not self._dialing and kind == "auth" and self._theirs:
            self._check(frame, "dial")
            self.done = True
            return []
        raise LinkError(f"unexpected {kind!r} frame during the handshake")

    def _challenge(self, hello: Mapping[str, Any]) -> dict[str, Any]:
        if hello.get("v") != LINK_VERSION:
            raise LinkError(f"link version {hello.get('v')!r}; this node speaks "
                            f"{LINK_VERSION}")
        self.peer = _name(hello.get("node"))
        if self.peer == self.node or not self._known(self.peer):
            raise LinkError(f"node {self.peer!r} is not a peer of this node")
        self._theirs = _nonce(hello.get("nonce"))
        return {"t": "challenge", "node": self.node, "nonce": self._nonce,
                "proof": self._proof("accept")}

    def _auth(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        name = _name(challenge.get("node"))
        if name != self.peer:
            raise LinkError(f"reached node {name!r}, expected {self.peer!r}")
        self._theirs = _nonce(challenge.get("nonce"))
        self._check(challenge, "accept")
        self.done = True
        return {"t": "auth", "proof": self._proof("dial")}

    def _proof(self, role: str) -> bytes:
        dialer, acceptor = (self.node, self.peer) if self._dialing else (self.peer, self.node)
        dial_nonce, accept_nonce = ((self._nonce, self._theirs) if self._dialing
                                    else (self._theirs, self._nonce))
        assert dialer is not None and acceptor is not None
        message = b"|".join([b"chatd-link", str(LINK_VERSION).encode(), role.encode(),
                             dialer.encode(), acceptor.encode(), dial_nonce, accept_nonce])
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _check(self, frame: Mapping[str, Any], role: str) -> None:
        proof = frame.get("proof")
        if type(proof) is not bytes or not hmac.compare_digest(proof, self._proof(role)):
            raise LinkError("the peer does not hold the cluster's key")


def _name(value: Any) -> str:
    if type(value) is not str or not 0 < len(value) <= 32:
        raise LinkError("a node name is 1-32 characters")
    return value


def _nonce(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != _NONCE_BYTES:
        raise LinkError(f"a nonce is {_NONCE_BYTES} random bytes")
    return value
