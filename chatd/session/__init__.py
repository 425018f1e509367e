"""The session actor: one per WebSocket connection, the user's presence on this node.

The session is split by job: :mod:`._session` opens the session and reads the client's
frames, :mod:`._writer` is the only task that writes to the socket, :mod:`._flood` is the
connection's flood budget, :mod:`._keepalive` decides when to ping a quiet client, and
:mod:`._acks` merges the acknowledgements one read brought.
"""

from ._session import CATCH_UP_BATCH, CLOSE_TIMEOUT, Session, SessionContext

__all__ = ["CATCH_UP_BATCH", "CLOSE_TIMEOUT", "Session", "SessionContext"]
