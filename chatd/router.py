"""Routing: from a sender's frame to the recipient's queue and session.

The router is not an actor of its own: its functions run in the task of the session that
received the frame (as ejabberd's router runs in the c2s process). Every item is first
queued in the store, and only then offered to the recipient's session if the registry
knows one, so a session that is gone, replaced or too slow never loses anything: it gets
the item from the store when its user connects again.

Offering never waits. A session whose mailbox is full is a consumer too slow to keep up:
it is told to exit (``slow_consumer``) and its user catches up from the store on the next
connection.

In a cluster, the registry also names sessions on other nodes: an item for one of them is
sent to that node in a ``dl`` link frame (batched with everything else the link carries),
where the node's router offers it to the session. A node the user has just left drops the
offer; the item waits in the user's queue for the next connection.

A caller that routes many items in a row (a session acting on everything one read brought)
passes a ``touched`` list: the items are queued without waking their sessions, the
mailboxes are added to the list, and the caller wakes each once when it is done
(:meth:`chatd.actors.Mailbox.wake`), so that a session gets them in one write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from chatd.actors import ActorTable, Mailbox
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.messages import Deliver
from chatd.protocol import Error, ErrorCode, ProtocolError, Send, Sent
from chatd.registry import Registry
from chatd.store import Entry, IdConflict, Message, Store, StoreUnavailable

__all__ = ["Router"]

logger = logging.getLogger(__name__)

_UNAVAILABLE = "the store cannot keep this durably now; nothing was stored, try again later"
_CONFLICT = "message id already used for another recipient"


class Router:
    """Accepts messages and acknowledgements and routes what follows from them.

    Args:
        actors: The node's actor table, to reach session mailboxes.
        registry: Where to find a user's session.
        store: Where every routed item is queued first.
        forward: Sends an entry to a session on another node (node, user, entry).
    """

    def __init__(self, actors: ActorTable, registry: Registry, store: Store,
                 forward: Callable[[str, str, Entry], None] | None = None) -> None:
        self._actors = actors
        self._node = actors.node
        self._sessions = registry.table
        self._store = store
        self._forward = forward
        #: Whether :meth:`submit_many` writes a run of sends together (a cluster's store).
        self.batches_sends = hasattr(store, "submit_many")
        self._log = EventLog(logger, actors.node, "router")

    async def submit(self, sender: str, frame: Send,
                     touched: list[Mailbox[Any]] | None = None) -> Sent:
        """Accept a message from ``sender``: queue it for its recipient and offer it.

        Args:
            sender: The authenticated user sending.
            frame: The ``send`` frame.
            touched: Where to note a session offered an item without being woken.

        Returns:
            The ``sent`` frame for the sender; ``dup`` is set if the id was seen before.

        Raises:
            ProtocolError: ``id_conflict`` if the id was used for another recipient;
                ``store_unavailable`` if it could not be stored (not accepted: send again).
        """
        message = Message(frame.id, sender, frame.to, frame.body, now_ms())
        try:
            accepted = await self._store.submit(message)
        except IdConflict:
            raise ProtocolError(ErrorCode.ID_CONFLICT, _CONFLICT, ref=frame.id) from None
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, _UNAVAILABLE,
                                ref=frame.id) from None
        if accepted.entry is not None:
            self.offer(frame.to, accepted.entry, touched)
        return Sent(frame.id, accepted.ts, accepted.duplicate)

    async def submit_many(self, sender: str, frames: Sequence[Send],
                          touched: list[Mailbox[Any]] | None = None) -> list[Sent | Error]:
        """Accept a run of messages from ``sender``, in order, written together.

        Only for a store with ``submit_many`` (:attr:`batches_sends`): in a cluster a run
        of sends costs one round trip per leader instead of one per message.

        Returns:
            The answer to each frame: ``sent``, or an ``error`` (``id_conflict``,
            ``store_unavailable``) with its id as ``ref``.
        """
        now = now_ms()
        messages = [Message(f.id, sender, f.to, f.body, now) for f in frames]
        outcomes = await self._store.submit_many(messages)  # type: ignore[attr-defined]
        answers: list[Sent | Error] = []
        for frame, outcome in zip(frames, outcomes, strict=True):
            if isinstance(outcome, IdConflict):
                answers.append(Error(ErrorCode.ID_CONFLICT.value, _CONFLICT, frame.id))
            elif isinstance(outcome, Exception):
                answers.append(Error(ErrorCode.STORE_UNAVAILABLE.value, _UNAVAILABLE,
                                     frame.id))
            else:
                if outcome.entry is not None:
                    self.offer(frame.to, outcome.entry, touched)
                answers.append(Sent(frame.id, outcome.ts, outcome.duplicate))
        return answers

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None,
                          touched: list[Mailbox[Any]] | None = None) -> None:
        """Apply ``user``'s acknowledgement and route the receipts it produces.

        Raises:
            ProtocolError: ``store_unavailable`` if it could not be stored; nothing changed.
        """
        try:
            queued = await self._store.acknowledge(user, status, upto, peer)
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, _UNAVAILABLE) from None
        for sender, entry in queued:
            self.offer(sender, entry, touched)

    def offer(self, user: str, entry: Entry,
              touched: list[Mailbox[Any]] | None = None, *, forward: bool = True) -> None:
        """Offer a stored entry to ``user``'s session, wherever the registry puts it.

        Args:
            user: Whose queue the entry is in.
            entry: The stored entry.
            touched: If given, a local session is not woken: its mailbox is appended here.
            forward: Whether to send it on to a session on another node (not for an
                entry that came from another node).
        """
        address = self._sessions.get(user)
        if address is None:
            return
        if address.node != self._node:
            if forward and self._forward is not None:
                self._forward(address.node, user, entry)
            return
        mailbox = self._actors.lookup(address)
        if mailbox is None:
            return
        if mailbox.deliver_nowait(Deliver(entry), wake=touched is None):
            if touched is not None:
                touched.append(mailbox)
        elif not mailbox.exiting:
            self._log.warning("slow_consumer", user=user, queued=mailbox.capacity)
            mailbox.exit(ErrorCode.SLOW_CONSUMER)

