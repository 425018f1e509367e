"""Addresses, bounded mailboxes, and the per-node table that maps one to the other.

An :class:`Address` is a plain value, like an Erlang pid: the name of a node and a serial
number unique on that node. It can be stored, compared, and sent to another node. A
:class:`Mailbox` is the local object behind an address: a bounded queue plus
an out-of-band exit signal that does not queue behind ordinary messages (a full mailbox
must still be able to receive "you are too slow, stop"). The :class:`ActorTable` of a node
hands out addresses and resolves them; it is owned by the node, never module state.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import attrs
import trio

from chatd.logs import EventLog

__all__ = ["ActorTable", "Address", "Mailbox"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class Address:
    """Where an actor can be reached: its node and its serial number on that node.

    ``name`` describes the actor in logs (``session:alice``); it is not part of identity.
    """

    node: str
    serial: int
    name: str = attrs.field(eq=False, default="")

    def __str__(self) -> str:
        return f"{self.name or 'actor'}@{self.node}#{self.serial}"


class Mailbox(Generic[T]):
    """A bounded queue of messages for one actor, plus an out-of-band exit signal.

    The queue is a deque with one receiving task, parked with trio's low-level API, so a
    delivery costs an append and, if the actor was waiting, one reschedule. A delivery may
    also be *deferred* (``deliver_nowait(message, wake=False)``) and the actor woken later
    with :meth:`wake`, so that a task delivering many messages wakes each actor once.

    An actor that can act on its messages synchronously may install :attr:`inline`: a
    function that :meth:`wake` calls, in the delivering task, instead of waking the actor's
    task while it is parked in :meth:`receive`. It returns True if it took care of the
    messages (the actor's task stays parked), False to have the task woken as usual. If it
    raises, the failure is the actor's, not the delivering task's: it is logged
    (``inline_failed``), the handler is removed, and the actor is told to exit with the
    exception as its reason; the delivering task goes on.

    Args:
        address: The address this mailbox answers to.
        capacity: How many messages may wait before :meth:`deliver_nowait` refuses.
    """

    __slots__ = ("_closed", "_exited", "_on_exit", "_queue", "_receiver", "_scope", "_senders",
                 "address", "capacity", "exit_reason", "inline")

    def __init__(self, address: Address, capacity: int) -> None:
        self.address = address
        self.capacity = capacity
        if capacity < 1:
            raise ValueError("a mailbox holds at least one message")
        self._queue: collections.deque[T] = collections.deque()
        self._receiver: trio.lowlevel.Task | None = None
        self._senders = trio.lowlevel.ParkingLot()
        self._closed = False
        self._scope: trio.CancelScope | None = None
        self._on_exit: Callable[[], None] | None = None
        self._exited = False
        self.exit_reason: Any = None
        #: The actor's synchronous handler, if it has one (see the class description).
        self.inline: Callable[[], bool] | None = None

    def deliver_nowait(self, message: T, *, wake: bool = True) -> bool:
        """Queue ``message`` without waiting.

        Args:
            message: What to deliver.
            wake: False to leave the actor parked until someone calls :meth:`wake`.

        Returns:
            False if the mailbox is full or closed; the caller decides what that means
            (for a session: the consumer is too slow and is disconnected).
        """
        if self._closed or len(self._queue) >= self.capacity:
            return False
        self._queue.append(message)
        if wake:
            self.wake()
        return True

    def wake(self) -> None:
        """Let the actor see what was delivered: inline if it can, else wake its task."""
        task = self._receiver
        if task is None or not self._queue:
            return
        inline = self.inline
        if inline is not None:
            try:
                if inline():
                    return
            except Exception as exc:
                self.inline = None
                EventLog(logger, self.address.node, "mailbox").error(
                    "inline_failed", error="inline_failed", actor=str(self.address),
                    exc_info=True)
                self.exit(exc)
        if self._receiver is task:
            self._receiver = None
            trio.lowlevel.reschedule(task)

    async def deliver(self, message: T) -> None:
        """Queue ``message``, waiting for room.

        Raises:
            trio.BrokenResourceError: The actor has stopped.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._queue) >= self.capacity and not self._closed:
            await self._senders.park()
        if self._closed:
            raise trio.BrokenResourceError("mailbox closed")
        self._queue.append(message)
        self.wake()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> T:
        """Wait for and return the next message.

        Raises:
            trio.ClosedResourceError: The mailbox was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if self._closed:
                raise trio.ClosedResourceError("mailbox closed")
            if self._receiver is not None:
                raise trio.BusyResourceError("another task is receiving from this mailbox")
            self._receiver = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._receiver = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._take()

    def receive_nowait(self) -> T:
        """Return the next message if one is waiting.

        Raises:
            trio.WouldBlock: The mailbox is empty.
            trio.ClosedResourceError: The mailbox was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("mailbox closed")
        if not self._queue:
            raise trio.WouldBlock
        return self._take()

    def _take(self) -> T:
        message = self._queue.popleft()
        if self._senders:
            self._senders.unpark()
        return message

    def bind(self, scope: trio.CancelScope | None,
             on_exit: Callable[[], None] | None = None) -> None:
        """Attach what :meth:`exit` stops: the actor's scope, or its own exit handler.

        Args:
            scope: Cancelled on exit (None if the actor stops itself in ``on_exit``).
            on_exit: Called on exit, after the cancel, for actors that stop their tasks
                one by one (a session lets a write under way finish).
        """
        self._scope = scope
        self._on_exit = on_exit
        if self._exited:
            self._signal()

    def _signal(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._on_exit is not None:
            self._on_exit()

    @property
    def exiting(self) -> bool:
        """Whether the actor has been told to exit."""
        return self._exited

    def exit(self, reason: Any) -> None:
        """Ask the actor to stop now, whatever is queued. The first reason sticks."""
        if not self._exited:
            self._exited = True
            self.exit_reason = reason
        self._signal()

    def close(self) -> None:
        """Refuse further messages; queued ones are dropped with the mailbox.

        A task waiting in :meth:`receive` gets ``trio.ClosedResourceError``, tasks waiting
        in :meth:`deliver` get ``trio.BrokenResourceError``.
        """
        self._closed = True
        self._queue.clear()
        # The actor has stopped: nothing is left to signal. Its handlers refer back to it,
        # and dropping them lets it be freed without the collector's full pass.
        self.inline = self._on_exit = self._scope = None
        self._senders.unpark_all()
        task, self._receiver = self._receiver, None
        if task is not None:
            trio.lowlevel.reschedule(task)


class ActorTable:
    """One node's map from addresses to live mailboxes.

    Args:
        node: The name of the node that owns this table.
    """

    __slots__ = ("_mailboxes", "_serials", "node")

    def __init__(self, node: str) -> None:
        self.node = node
        self._serials = itertools.count(1)
        self._mailboxes: dict[int, Mailbox[Any]] = {}

    def open(self, name: str, capacity: int) -> Mailbox[Any]:
        """Create a mailbox with a fresh address on this node."""
        mailbox: Mailbox[Any] = Mailbox(Address(self.node, next(self._serials), name), capacity)
        self._mailboxes[mailbox.address.serial] = mailbox
        return mailbox

    def release(self, mailbox: Mailbox[Any]) -> None:
        """Forget a mailbox (its actor has stopped) and close it."""
        if self._mailboxes.get(mailbox.address.serial) is mailbox:
            del self._mailboxes[mailbox.address.serial]
        mailbox.close()

    def lookup(self, address: Address) -> Mailbox[Any] | None:
        """The live mailbox at ``address``, or None (stopped, or on another node)."""
        if address.node != self.node:
            return None
        return self._mailboxes.get(address.serial)

    def exit(self, address: Address, reason: Any) -> bool:
        """Send an exit signal to a local actor; False if it is gone."""
        mailbox = self.lookup(address)
        if mailbox is None:
            return False
        mailbox.exit(reason)
        return True

    def __len__(self) -> int:
        return len(self._mailboxes)

    def __iter__(self) -> Iterator[Mailbox[Any]]:
        return iter(list(self._mailboxes.values()))
