"""The listener: the WebSocket accept loop, and the supervisor of session actors.

Sessions are temporary children of the listener: a session that crashes is logged (a
normalized ``session_crashed`` error), its client gets close code 1011, and it is not
restarted; no other session notices. Each session runs in the task trio-websocket gives
its connection, so a connection costs no extra supervision task.

Shutdown comes in layers, driven by the node: :meth:`Listener.stop_accepting` closes the
listening sockets; :meth:`Listener.drain` asks every session to close with 1001 and waits,
up to a deadline, for them to finish.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)

from chatd.logs import EventLog, root_cause
from chatd.protocol import ErrorCode, ProtocolError
from chatd.session import CLOSE_TIMEOUT, Session, SessionContext

__all__ = ["Listener"]

logger = logging.getLogger(__name__)


class Listener:
    """Accepts WebSocket connections and runs one session actor for each.

    Args:
        ctx: The services sessions use.
    """

    def __init__(self, ctx: SessionContext) -> None:
        self._ctx = ctx
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
    def sessions(self) -> frozenset[Session]:
        """The sessions being served now."""
        return frozenset(self._sessions)

    async def run(self, *, task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Listen, start a session per connection, and serve until cancelled."""
        config = self._ctx.config
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        host, port = listeners[0].socket.getsockname()[:2]
        self.url = f"ws://{host}:{port}" if ":" not in host else f"ws://[{host}]:{port}"
        async with trio.open_nursery() as sessions:
            server = WebSocketServer(
                self._serve, listeners, handler_nursery=sessions,
                max_message_size=config.limits.max_frame_bytes,
                connect_timeout=config.handshake_timeout, disconnect_timeout=CLOSE_TIMEOUT)
            self._accept_scope = trio.CancelScope()
            sessions.start_soon(self._accept, server)
            self._log.info("listening", url=self.url)
            task_status.started(self)
            await trio.sleep_forever()

    async def _accept(self, server: WebSocketServer) -> None:
        with self._accept_scope:
            await server.run()

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

    async def _serve(self, request: WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        address = _address(ws)
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
        except Exception as exc:
            self._log.error("session_crashed", error="session_crashed", user=session.user,
                            exception=type(root_cause(exc)).__name__, exc_info=True)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                with contextlib.suppress(ConnectionClosed):
                    await ws.aclose(1011, ErrorCode.INTERNAL.value)
        finally:
            authenticated()
            self._sessions.discard(session)
            if not self._sessions:
                self._idle.set()


def _address(ws: WebSocketConnection) -> str:
    """The peer's network address (without the port), for per-address limits."""
    remote = ws.remote
    return str(getattr(remote, "address", remote))
