"""Requests between nodes: a frame sent on a link, and the answer that comes back.

A request is ``{"t": "q", "id": N, ...}``; its answer ``{"t": "r", "id": N, ...}``, or with
``"err": CODE`` when it was refused. :class:`Calls` numbers the requests a node sends and
matches the answers to them. A request fails with :class:`PeerGone` at once if its peer is
down, as soon as the peer goes down while it waits, and when no answer came within the
timeout; the caller decides whether to try again elsewhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attrs
import trio

__all__ = ["Calls", "PeerGone", "Refused", "Send"]

#: Sends a link frame to a peer.
Send = Callable[[str, dict[str, Any]], None]


class PeerGone(Exception):
    """A request's node went down or did not answer in time."""


class Refused(Exception):
    """A request was answered with an error ``code``."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@attrs.define(slots=True)
class _Call:
    peer: str
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None


class Calls:
    """The requests this node has sent and not yet had answered.

    Args:
        send: Sends a frame on the link to a peer.
        is_up: Whether a peer is reachable now.
        timeout: Seconds a request may wait for its answer.
    """

    def __init__(self, send: Send, is_up: Callable[[str], bool], timeout: float) -> None:
        self._send = send
        self._is_up = is_up
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}

    async def call(self, peer: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request to ``peer`` and wait for its answer.

        Returns:
            The answer's fields (without ``t`` and ``id``).

        Raises:
            PeerGone: The peer is down, went down, or did not answer within the timeout.
            Refused: The peer answered with an error.
        """
        if not self._is_up(peer):
            raise PeerGone(peer)
        call_id = next(self._ids)
        call = self._calls[call_id] = _Call(peer)
        try:
            self._send(peer, {"t": "q", "id": call_id, **frame})
            with trio.move_on_after(self._timeout):
                await call.done.wait()
        finally:
            del self._calls[call_id]
        reply = call.reply
        if reply is None:
            raise PeerGone(peer)
        if "err" in reply:
            raise Refused(str(reply["err"]))
        return {k: v for k, v in reply.items() if k not in ("t", "id")}

    def answered(self, peer: str, frame: dict[str, Any]) -> None:
        """An answer frame from ``peer``; one that matches no request is ignored."""
        call = self._calls.get(frame.get("id", 0))
        if call is not None and call.peer == peer:
            call.reply = frame
            call.done.set()

    def peer_down(self, peer: str) -> None:
        """``peer`` went down: its requests fail now."""
        for call in self._calls.values():
            if call.peer == peer:
                call.done.set()
