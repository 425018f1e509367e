"""The registry actor: which session serves which user.

Writes go through the registry's mailbox, one at a time, so a login that takes over an
existing session is decided in one place: the new session is recorded and the old one gets
an exit signal (``session_replaced``). Reads do not queue: the router looks users up in
:attr:`Registry.table` directly, as Erlang code reads an ETS table, so routing a message
costs a dict lookup and no message hop.

The table belongs to the :class:`Registry` object, not to the actor's task, so it survives
a crash and restart of the actor loop. An :class:`~chatd.actors.Address` may name a session
on another node; the cluster (issue #6) fills the table with those.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs
import trio

from chatd.actors import ActorTable, Address, Mailbox
from chatd.logs import EventLog
from chatd.protocol import ErrorCode

__all__ = ["Registry"]

logger = logging.getLogger(__name__)


@attrs.frozen
class _Register:
    user: str
    address: Address
    done: trio.Event


@attrs.frozen
class _Unregister:
    user: str
    address: Address


class Registry:
    """Maps each online user to the address of their session.

    Args:
        actors: The node's actor table (to open the mailbox and signal replaced sessions).
        capacity: The registry mailbox's capacity.
    """

    def __init__(self, actors: ActorTable, *, capacity: int = 4096) -> None:
        self._actors = actors
        self._table: dict[str, Address] = {}
        self._mailbox: Mailbox[_Register | _Unregister] = actors.open("registry", capacity)
        self._log = EventLog(logger, actors.node, "registry")

    @property
    def table(self) -> Mapping[str, Address]:
        """Read-only view of user -> session address, for lookups on the hot path."""
        return self._table

    async def register(self, user: str, address: Address) -> None:
        """Make ``address`` the session of ``user``; returns once recorded.

        A session already registered for ``user`` is told to exit with
        ``session_replaced``.
        """
        done = trio.Event()
        await self._mailbox.deliver(_Register(user, address, done))
        await done.wait()

    async def unregister(self, user: str, address: Address) -> None:
        """Forget ``address`` as ``user``'s session, if it still is."""
        await self._mailbox.deliver(_Unregister(user, address))

    async def run(self, *, task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The actor loop: apply registrations in arrival order."""
        task_status.started(self)
        while True:
            match await self._mailbox.receive():
                case _Register(user, address, done):
                    old = self._table.get(user)
                    self._table[user] = address
                    if old is not None and old != address:
                        self._actors.exit(old, ErrorCode.SESSION_REPLACED)
                        self._log.info("session_replaced", user=user, old=str(old),
                                       new=str(address))
                    done.set()
                case _Unregister(user, address):
                    if self._table.get(user) == address:
                        del self._table[user]
