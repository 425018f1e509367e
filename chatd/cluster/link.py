"""Links between nodes: one supervised link actor per peer, heartbeats, failure detection.

Each node listens for links on its cluster address (``cluster_listen``) and knows its peers
from configuration (``peers``: name -> HOST:PORT). Between two nodes there is one TCP
connection: the node whose name sorts first dials, the other accepts, so the pair never
races to open two. The dialer tries again after a jittered backoff (0.1 s doubling to 2 s)
for as long as the peer is away, so a link comes back by itself when the peer returns.

On a connection, the two nodes first run the handshake of :mod:`chatd.cluster._wire`
(proving that both hold the cluster's key), then exchange frames. Each side sends a
``beat`` frame every ``heartbeat_interval`` seconds when it has sent nothing else, and
treats any frame as a sign of life; a peer not heard from for ``failure_timeout`` seconds is
declared down and its connection dropped. :class:`Membership` records which peers are up
and logs ``peer_up`` / ``peer_down``.

Frames for a peer wait in its link's outbox and are written together, one ``send_all``
for everything queued (:meth:`Cluster.send`); an outbox that overflows (a peer that stopped
reading) drops the link, and the next one starts with a fresh ``sync``. Received frames other
than heartbeats go to the node's :class:`LinkHandler` (:class:`chatd.cluster.NodeLinks`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from chatd.actors import ChildSpec, Restart, Supervisor
from chatd.config import Config, host_port
from chatd.logs import EventLog

from ._wire import FrameDecoder, Handshake, LinkError, encode_frame

__all__ = ["Cluster", "LinkHandler", "Membership"]

logger = logging.getLogger(__name__)

#: Seconds allowed for the handshake on a new connection.
HANDSHAKE_TIMEOUT = 5.0
#: Frames that may wait for one peer before its link is dropped as stuck.
OUTBOX_FRAMES = 65536


class LinkHandler(Protocol):
    """What a node does with its links' events."""

    async def peer_up(self, peer: str) -> None:
        """A link to ``peer`` is up."""

    async def peer_down(self, peer: str) -> None:
        """The link to ``peer`` is down."""

    async def remote(self, peer: str, frame: dict[str, Any]) -> None:
        """A frame from ``peer``."""
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 2.0


class Membership:
    """Which peers are linked now.

    Args:
        log: Where ``peer_up`` and ``peer_down`` go.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._up: set[str] = set()
        self._changed = trio.Event()

    @property
    def up(self) -> frozenset[str]:
        """The peers linked now."""
        return frozenset(self._up)

    def is_up(self, peer: str) -> bool:
        """Whether ``peer`` is linked now."""
        return peer in self._up

    def mark(self, peer: str, up: bool, reason: str = "") -> None:
        """Record that ``peer`` came up or went down, once per change."""
        if up == (peer in self._up):
            return
        if up:
            self._up.add(peer)
            self._log.info("peer_up", peer=peer)
        else:
            self._up.discard(peer)
            self._log.warning("peer_down", peer=peer, reason=reason)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change."""
        await self._changed.wait()


class _Link:
    """The link actor of one peer: owns at most one connection to it at a time."""

    def __init__(self, cluster: Cluster, peer: str, address: str) -> None:
        self._cluster = cluster
        self.peer = peer
        self._address = host_port(address)
        self.dials = cluster.node < peer
        self._inbound: trio.MemorySendChannel[
            tuple[trio.SocketStream, FrameDecoder, trio.Event]]
        self._inbound, self._accepted = trio.open_memory_channel(1)
        self._current: trio.CancelScope | None = None
        self._reason = ""
        self._outbox: trio.MemorySendChannel[dict[str, Any]] | None = None

    async def run(self, *, task_status: trio.TaskStatus[_Link] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Dial (or wait to be dialled), serve the connection, and start again."""
        task_status.started(self)
        attempt = 0
        while True:
            if self.dials:
                dialled = await self._dial()
                if dialled is None:
                    attempt += 1
                    await trio.sleep(random.uniform(0, min(_BACKOFF_MAX,
                                                           _BACKOFF_FIRST * 2 ** attempt)))
                    continue
                await self._serve(*dialled)
            else:
                stream, decoder, done = await self._accepted.receive()
                try:
                    await self._serve(stream, decoder)
                finally:
                    done.set()
            attempt = 0

    def send(self, frame: dict[str, Any]) -> None:
        """Queue ``frame`` for the peer if the link is up; drop the link if it is stuck."""
        outbox = self._outbox
        if outbox is None:
            return  # down: the next link starts with a sync
        try:
            outbox.send_nowait(frame)
        except trio.WouldBlock:
            self._reason = f"more than {OUTBOX_FRAMES} frames waiting for the peer"
            if self._current is not None:
                self._current.cancel()

    def offer(self, stream: trio.SocketStream, decoder: FrameDecoder) -> trio.Event | None:
        """Hand over an accepted, authenticated connection; it replaces the one being
        served, if any (the peer came back before its old link was found dead).

        Returns:
            An event set once the link is done with the connection, or None if another
            new connection is already waiting to be served.
        """
        done = trio.Event()
        try:
            self._inbound.send_nowait((stream, decoder, done))
        except trio.WouldBlock:
            return None
        if self._current is not None:
            self._current.cancel()
        return done

    async def _dial(self) -> tuple[trio.SocketStream, FrameDecoder] | None:
        cluster = self._cluster
        decoder = FrameDecoder()
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stream = await trio.open_tcp_stream(*self._address)
                try:
                    handshake = Handshake(cluster.key, cluster.node, peer=self.peer)
                    await stream.send_all(encode_frame(handshake.start()))
                    await _shake(stream, handshake, decoder)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except (OSError, trio.TooSlowError, trio.BrokenResourceError):
            return None
        except LinkError as err:
            cluster.log.warning("link_refused", peer=self.peer, reason=str(err))
            return None
        return stream, decoder

    async def _serve(self, stream: trio.SocketStream, decoder: FrameDecoder) -> None:
        cluster = self._cluster
        heard = trio.current_time()
        reason = "connection lost"
        outbox, pending = trio.open_memory_channel[dict[str, Any]](OUTBOX_FRAMES)
        self._outbox = outbox
        self._reason = ""
        cluster.membership.mark(self.peer, True)
        self._current = scope = trio.CancelScope()
        try:
            with scope:
                if cluster.handler is not None:
                    await cluster.handler.peer_up(self.peer)
                await self._exchange(stream, decoder, heard, pending)
            if scope.cancelled_caught:
                reason = self._reason or "replaced by a new connection from the peer"
            else:
                reason = self._reason or "connection lost"
        finally:
            self._current = None
            self._outbox = None
            cluster.membership.mark(self.peer, False, reason)
            if cluster.handler is not None:
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await cluster.handler.peer_down(self.peer)

    async def _exchange(self, stream: trio.SocketStream, decoder: FrameDecoder,
                        heard: float, pending: trio.MemoryReceiveChannel[dict[str, Any]]
                        ) -> None:
        cluster = self._cluster
        config = cluster.config
        try:
            async with stream, trio.open_nursery() as nursery:

                async def write() -> None:
                    """Everything queued in one write; a heartbeat when there is nothing."""
                    while True:
                        frames = [{"t": "beat"}]
                        with trio.move_on_after(config.heartbeat_interval):
                            frames = [await pending.receive()]
                        while True:
                            try:
                                frames.append(pending.receive_nowait())
                            except trio.WouldBlock:
                                break
                        await stream.send_all(b"".join(encode_frame(f) for f in frames))

                nursery.start_soon(write)
                backlog, decoder.backlog = decoder.backlog, []
                for frame in backlog:
                    if frame["t"] != "beat" and cluster.handler is not None:
                        await cluster.handler.remote(self.peer, frame)
                while True:
                    with trio.move_on_at(heard + config.failure_timeout) as quiet:
                        data = await stream.receive_some()
                    if quiet.cancelled_caught:
                        self._reason = f"nothing heard for {config.failure_timeout} s"
                        break
                    if not data:
                        break
                    for frame in decoder.feed(data):
                        if frame["t"] != "beat" and cluster.handler is not None:
                            await cluster.handler.remote(self.peer, frame)
                    # Silence counts from when this node is ready to read again: handing
                    # over a burst (20,000 sessions closing) can take longer than
                    # failure_timeout, and the peer was not silent meanwhile.
                    heard = trio.current_time()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except* LinkError as group:
            self._reason = str(group.exceptions[0])


class Cluster:
    """This node's links: the cluster listener and one supervised link actor per peer.

    Args:
        config: The node's configuration (``node``, ``cluster_listen``, ``peers``,
            ``heartbeat_interval``, ``failure_timeout``).
        key: The cluster's link key (:func:`chatd.cluster.link_key`).
    """

    def __init__(self, config: Config, key: bytes) -> None:
        self.config = config
        self.node = config.node
        self.key = key
        self.log = EventLog(logger, config.node, "cluster")
        self.membership = Membership(self.log)
        #: Where link events and frames go (set by the node: its registry).
        self.handler: LinkHandler | None = None
        self._links: Mapping[str, _Link] = {
            name: _Link(self, name, address) for name, address in config.peers.items()}
        self.address = ""

    async def run(self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Listen for links and run every link actor under a supervisor."""
        assert self.config.cluster_listen is not None
        host, port = host_port(self.config.cluster_listen)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        supervisor = Supervisor("cluster", node=self.node)
        children = [ChildSpec(f"link:{name}", link.run, Restart.PERMANENT)
                    for name, link in self._links.items()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            await nursery.start(supervisor.run, children)
            self.log.info("cluster_listening", address=self.address,
                          peers=sorted(self._links))
            task_status.started(self)

    def send(self, peer: str | None, frame: dict[str, Any]) -> None:
        """Queue ``frame`` for ``peer`` (None: every peer); dropped for a peer that is down."""
        if peer is not None:
            link = self._links.get(peer)
            if link is not None:
                link.send(frame)
            return
        for link in self._links.values():
            link.send(frame)

    async def _accept(self, stream: trio.SocketStream) -> None:
        """Authenticate an inbound link and hand it to its peer's link actor."""
        handshake = Handshake(self.key, self.node,
                              known=lambda name: name in self._links and
                              not self._links[name].dials)
        decoder = FrameDecoder()
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await _shake(stream, handshake, decoder)
        except LinkError as err:
            self.log.warning("link_refused", peer=handshake.peer or "", reason=str(err))
            await trio.aclose_forcefully(stream)
            return
        except (OSError, trio.TooSlowError, trio.BrokenResourceError):
            await trio.aclose_forcefully(stream)
            return
        assert handshake.peer is not None
        done = self._links[handshake.peer].offer(stream, decoder)
        if done is None:
            await trio.aclose_forcefully(stream)
            return
        await done.wait()  # trio.serve_listeners closes the stream when this returns


async def _shake(stream: trio.SocketStream, handshake: Handshake, decoder: FrameDecoder
                 ) -> None:
    """Run ``handshake`` on ``stream`` until it is done; frames after it stay in ``decoder``.

    Raises:
        LinkError: The peer failed the handshake or closed the connection during it.
    """
    while not handshake.done:
        data = await stream.receive_some()
        if not data:
            raise LinkError("closed during the handshake")
        replies, after = handshake.receive_all(decoder.feed(data))
        # The peer's first frames may come with its last handshake frame.
        decoder.backlog.extend(after)
        if replies:
            await stream.send_all(b"".join(encode_frame(reply) for reply in replies))
