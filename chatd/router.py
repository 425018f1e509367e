"""Routing: from a sender's frame to the recipient's queue and session.

The router is not an actor of its own: its functions run in the task of the session that
received the frame (as ejabberd's router runs in the c2s process). Every item is first
queued through the backend's queues, and only then offered on the backend's bus, which
brings it to the process holding the recipient's session, so a session that is gone,
replaced or too slow never loses anything: it gets the item from its queue when its user
connects again.

What the bus brings to this process reaches the session through :meth:`Router.deliver`,
which never waits. A session whose mailbox is full is a consumer too slow to keep up: it is
told to exit (``slow_consumer``) and its user catches up from the queue on the next
connection.

A caller that routes many items in a row (a session acting on everything one read brought)
passes a ``touched`` list: the items are queued without waking their sessions, the
mailboxes are added to the list, and the caller wakes each once when it is done
(:meth:`chatd.actors.Mailbox.wake`), so that a session gets them in one write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from chatd.actors import ActorTable, Mailbox
from chatd.backends import (
    Bus,
    Entry,
    IdConflict,
    Message,
    Queues,
    ReceiptItem,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.messages import Deliver, offer
from chatd.metrics import Metrics
from chatd.protocol import Error, ErrorCode, ProtocolError, Send, Sent
from chatd.registry import Registry

__all__ = ["Router"]

logger = logging.getLogger(__name__)

_UNAVAILABLE = "the store cannot keep this durably now; nothing was stored, try again later"
_CONFLICT = "message id already used for another recipient"


class Router:
    """Accepts messages and acknowledgements and routes what follows from them.

    Args:
        actors: The node's actor table, to reach session mailboxes.
        registry: Where to find the local session of a user.
        queues: Where every routed item is queued first.
        bus: What brings a stored item to the process holding its user's session.
        metrics: Where messages accepted and acknowledged are counted.
    """

    def __init__(self, actors: ActorTable, registry: Registry, queues: Queues,
                 bus: Bus, metrics: Metrics) -> None:
        self._metrics = metrics
        self._actors = actors
        self._sessions = registry.local
        self._queues = queues
        self._bus = bus
        self._log = EventLog(logger, actors.node, "router")

    async def submit_many(self, sender: str, frames: Sequence[Send],
                          touched: list[Mailbox[Any]] | None = None,
                          read_at: float | None = None) -> list[Sent | Error]:
        """Accept a run of messages from ``sender``, in order, written together.

        The run's latency (hop 1, from ``read_at`` to the write's end) is observed once for
        every ``sent`` answer, a ``store_unavailable`` answer is counted as a send failure,
        and each stored message is offered with the time it was stored (where hop 2
        starts).

        Args:
            sender: The authenticated user sending.
            frames: The ``send`` frames.
            touched: Where to note a session offered an item without being woken.
            read_at: When the client message that carried the frames was read (node
                clock); the time the write started if None.

        Returns:
            The answer to each frame: ``sent`` (``dup`` set if the id was seen before), or
            an ``error`` (``id_conflict``, ``store_unavailable``) with its id as ``ref``.
        """
        metrics = self._metrics
        if read_at is None:
            read_at = metrics.now()
        now = now_ms()
        messages = [Message(f.id, sender, f.to, f.body, now) for f in frames]
        outcomes = await self._queues.submit_many(messages)
        stored = metrics.now()
        answers: list[Sent | Error] = []
        accepted = answered = failed = 0
        for frame, outcome in zip(frames, outcomes, strict=True):
            if isinstance(outcome, IdConflict):
                metrics.errors[ErrorCode.ID_CONFLICT.value] += 1
                answers.append(Error(ErrorCode.ID_CONFLICT.value, _CONFLICT, frame.id))
            elif isinstance(outcome, Exception):
                failed += 1
                answers.append(Error(ErrorCode.STORE_UNAVAILABLE.value, _UNAVAILABLE,
                                     frame.id))
            else:
                if outcome.entry is not None:
                    accepted += 1
                    self._bus.offer(frame.to, outcome.entry, touched, stored)
                answered += 1
                answers.append(Sent(frame.id, outcome.ts, outcome.duplicate))
        metrics.messages_sent += accepted
        if answered:
            metrics.send_latency.observe_many(stored - read_at, answered)
        if failed:
            metrics.send_failures += failed
            metrics.errors[ErrorCode.STORE_UNAVAILABLE.value] += failed
        return answers

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None,
                          touched: list[Mailbox[Any]] | None = None) -> None:
        """Apply ``user``'s acknowledgement and route the receipts it produces.

        Raises:
            ProtocolError: ``store_unavailable`` if it could not be stored; nothing changed.
        """
        try:
            queued = await self._queues.acknowledge(user, status, upto, peer)
        except StoreUnavailable:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, _UNAVAILABLE) from None
        metrics = self._metrics
        for sender, entry in queued:
            item = entry.item
            if isinstance(item, ReceiptItem):
                if item.status == "read":
                    metrics.messages_read += len(item.ids)
                else:
                    metrics.messages_delivered += len(item.ids)
            self._bus.offer(sender, entry, touched)

    def deliver(self, user: str, entry: Entry, prev: int = -1,
                touched: list[Mailbox[Any]] | None = None, stored: float = 0.0) -> None:
        """Offer a stored entry to ``user``'s session on this node, if there is one.

        The bus calls this for every entry it brings here. It never waits.

        Args:
            user: Whose queue the entry is in.
            entry: The stored entry.
            prev: The seq of the item before it in the queue, or -1 (see
                :class:`chatd.messages.Deliver`).
            touched: If given, the session is not woken: its mailbox is appended here.
            stored: When the entry was stored, on this node's clock (0: unknown).
        """
        address = self._sessions.get(user)
        if address is None:
            return
        mailbox = self._actors.lookup(address)
        if mailbox is None:
            return
        if offer(mailbox, Deliver(entry, prev, stored), self._log, wake=touched is None,
                 user=user) and touched is not None:
            touched.append(mailbox)
