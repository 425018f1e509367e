"""The listener: the WebSocket accept loop, and the supervisor of session actors.

Sessions are temporary children of the listener: a session that crashes is logged (a
normalized ``session_crashed`` error), its client gets close code 1011, and it is not
restarted; no other session notices. The accept loop waits on the listening sockets with
``trio.lowlevel.wait_readable`` and accepts what is ready in bursts; each connection gets
one task, which performs the WebSocket handshake (bounded by ``handshake_timeout``) and
then runs the session, so a connection costs no extra supervision task.

Shutdown comes in layers, driven by the node: :meth:`Listener.stop_accepting` closes the
listening sockets; :meth:`Listener.drain` asks every session to close with 1001 and waits,
up to a deadline, for them to finish.

With ``reuse_port`` the listening sockets carry SO_REUSEPORT: the workers of
``chatd serve --workers`` each listen on the same port, and the kernel spreads new
connections among them (:mod:`chatd.workers`).

With ``tls_cert`` and ``tls_key`` every connection speaks TLS first (:mod:`chatd.tls`) and the
listener serves ``wss://``; the certificate and key are loaded when the listener is made, so
a file that cannot be used stops the node before it listens.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
from pathlib import Path

import trio

from chatd.logs import EventLog
from chatd.protocol import ErrorCode, ProtocolError
from chatd.protocol.websocket import HandshakeError
from chatd.session import CLOSE_TIMEOUT, Session, SessionContext
from chatd.tls import TlsWebSocket, server_context
from chatd.transport import ConnectionClosed, WebSocket, is_fd_exhaustion

__all__ = ["Listener", "open_listening_sockets", "reserve_port", "unused_port"]

logger = logging.getLogger(__name__)

#: Connections accepted per wake-up of the accept loop before it yields.
_ACCEPT_BURST = 64
#: Seconds the accept loop pauses when the process is out of file descriptors.
_EXHAUSTED_PAUSE = 0.1


class Listener:
    """Accepts WebSocket connections and runs one session actor for each.

    Args:
        ctx: The services sessions use.

    Raises:
        TlsError: The configured TLS certificate or key cannot be used.
    """

    def __init__(self, ctx: SessionContext) -> None:
        self._ctx = ctx
        config = ctx.config
        self._tls = (server_context(config.tls_cert, config.tls_key)
                     if config.tls_cert is not None and config.tls_key is not None else None)
        self._log = EventLog(logger, ctx.actors.node, "listener")
        self._accept_scope = trio.CancelScope()
        self._sessions: set[Session] = set()
        self._draining = False
        self._unauthenticated: collections.Counter[str] = collections.Counter()
        self._idle = trio.Event()
        self.url = ""

    @property
    def live_sessions(self) -> int:
        """How many connections are being served now."""
        return len(self._sessions)

    @property
    def authenticating(self) -> int:
        """How many of them have not had their hello accepted yet."""
        return sum(self._unauthenticated.values())

    @property
    def sessions(self) -> frozenset[Session]:
        """The sessions being served now."""
        return frozenset(self._sessions)

    async def run(self, *, task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Listen, start a session per connection, and serve until cancelled."""
        config = self._ctx.config
        sockets = open_listening_sockets(config.host, config.port,
                                         reuse_port=config.reuse_port)
        host, port = sockets[0].getsockname()[:2]
        scheme = "ws" if self._tls is None else "wss"
        self.url = (f"{scheme}://{host}:{port}" if ":" not in host
                    else f"{scheme}://[{host}]:{port}")
        try:
            async with trio.open_nursery() as sessions:
                self._accept_scope = trio.CancelScope()
                sessions.start_soon(self._ctx.keepalives.run)
                for sock in sockets:
                    sessions.start_soon(self._accept, sock, sessions)
                self._log.info("listening", url=self.url)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            _close_all(sockets)

    async def _accept(self, listening: socket.socket, sessions: trio.Nursery) -> None:
        with self._accept_scope:
            while True:
                await trio.lowlevel.wait_readable(listening)
                for _ in range(_ACCEPT_BURST):
                    try:
                        sock, _ = listening.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if not is_fd_exhaustion(exc):
                            raise
                        self._log.warning("accept_paused", error="too_many_open_files",
                                          errno=exc.errno)
                        await trio.sleep(_EXHAUSTED_PAUSE)
                        break
                    sessions.start_soon(self._serve, sock)
        _close_all([listening])

    def stop_accepting(self) -> None:
        """Close the listening sockets; sessions already open keep running."""
        self._accept_scope.cancel()

    async def drain(self, timeout: float) -> bool:
        """Ask every session to close (1001) and wait up to ``timeout`` s for them.

        Returns:
            True if every session ended in time.
        """
        self._draining = True
        for session in tuple(self._sessions):
            session.stop(ErrorCode.SHUTTING_DOWN)
        with trio.move_on_after(timeout):
            while self._sessions:
                self._idle = trio.Event()
                await self._idle.wait()
        return not self._sessions

    async def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        max_message = self._ctx.config.limits.max_frame_bytes
        ws = (WebSocket(sock, max_message) if self._tls is None
              else TlsWebSocket(sock, max_message, self._tls))
        try:
            with trio.move_on_after(self._ctx.config.handshake_timeout) as opening:
                await ws.handshake()
            if not opening.cancelled_caught:
                await self._session(ws)
        except (HandshakeError, ConnectionClosed):
            pass
        finally:
            ws.abort()

    async def _session(self, ws: WebSocket) -> None:
        address = ws.remote
        if self._unauthenticated[address] >= self._ctx.config.max_unauthenticated_per_address:
            await Session(self._ctx, ws).refuse(ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                "too many connections from this address are waiting to authenticate"))
            return
        self._unauthenticated[address] += 1
        waiting = True

        def authenticated() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self._unauthenticated[address] -= 1
                if not self._unauthenticated[address]:
                    del self._unauthenticated[address]

        session = Session(self._ctx, ws, on_authenticated=authenticated)
        if self._draining:
            session.stop(ErrorCode.SHUTTING_DOWN)
        self._sessions.add(session)
        try:
            await session.run()
        except Exception:
            self._log.error("session_crashed", error="session_crashed", user=session.user,
                            exc_info=True)
            await ws.close(1011, ErrorCode.INTERNAL.value, timeout=CLOSE_TIMEOUT)
        finally:
            authenticated()
            self._sessions.discard(session)
            if not self._sessions:
                self._idle.set()


def open_listening_sockets(host: str, port: int, *, backlog: int = 1024,
                           reuse_port: bool = False) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to, non-blocking.

    With port 0 the first socket picks a free port and the others use the same one.

    Args:
        host: The address (or name) to listen on; empty for every interface.
        port: The port; 0 picks a free one.
        backlog: Connections the kernel may queue before they are accepted.
        reuse_port: Set SO_REUSEPORT, so that other processes of this user may listen on
            the same port and the kernel spreads new connections among them (the workers
            of ``chatd serve --workers``).

    Raises:
        OSError: An address cannot be bound (in use, not local, ...).
    """
    sockets = _bind_all(host, port, reuse_port=reuse_port)
    try:
        for sock in sockets:
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        _close_all(sockets)
        raise
    return sockets


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind, but do not listen on, every address ``host`` resolves to, with SO_REUSEPORT.

    The sockets hold the port for processes that then listen on it with ``reuse_port``:
    nobody else can bind it meanwhile, and since they never listen, the kernel never hands
    them a connection. With port 0 the system picks a free port (read it with
    ``getsockname``).

    Raises:
        OSError: An address cannot be bound (in use, not local, ...).
    """
    return _bind_all(host, port, reuse_port=True)


def _bind_all(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError:
        for sock in sockets:  # never waited on: no need to tell trio
            sock.close()
        raise
    return sockets


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
            sock.close()


#: Where Linux says its ephemeral ports (the source ports of outgoing connections) are.
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def unused_port(host: str = "127.0.0.1", *, exclude: frozenset[int] = frozenset()) -> int:
    """A port on ``host`` that nothing is bound to now, below the ephemeral range.

    A port the system picks for ``bind(0)`` comes from the range it also takes the source
    ports of outgoing connections from: between choosing it and a process binding it, a
    connection (a node dialling its peer) may take it. Ports below that range are never
    taken that way, so one chosen here stays free until somebody binds it on purpose.

    Args:
        host: The address to bind.
        exclude: Ports not to return (ones already chosen for something else).

    Raises:
        OSError: No free port was found in 500 tries.
    """
    try:
        low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = max(1024, low - 16384)
    for _ in range(500):
        port = random.randrange(first, low)
        if port in exclude:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} between {first} and {low}")
