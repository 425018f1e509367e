"""The durable store's index: where each queued item is on disk, not the item itself.

A queued item of the durable store is already in a record of both replicas, at the same
position on each (the journal writes them identically). The :class:`RefIndex` keeps, per
user, four compact arrays in seq order — sequence numbers, segment serials, offsets, and
sizes — 24 bytes per queued item, and no item: bodies are read back from disk when a
backlog is streamed (:mod:`._bodies`). A size is stored doubled, plus 1 for a receipt, so
that an acknowledgement knows which of the items it removes are messages (whose sender and
id it needs) without reading them.

It also counts, per segment, the queued items in it and roughly their bytes (the item's
size plus :data:`RECORD_OVERHEAD`), which tells the store which segments it may delete and
which are worth compacting.

Like every index, it changes only in the journal's ``apply`` hooks (in log order) and at
recovery; its methods do no I/O except :meth:`RefIndex.users`.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterator, Sequence

from chatd.backends._acks import apply_ack, plan_receipts
from chatd.backends._records import Entry

from ._index import Acked, BaseIndex, QueueState
from ._segments import Position

__all__ = ["RECORD_OVERHEAD", "Arrays", "Newly", "Ref", "RefIndex"]

#: Where an item is: (seq, segment serial, offset).
Ref = tuple[int, int, int]
#: Messages leaving a queue, as ``(seq, sender, id)``.
Newly = list[tuple[int, str, str]]
#: A queue's items as packed arrays: seqs, serials, offsets, sizes (doubled, +1: receipt).
Arrays = tuple["array[int]", "array[int]", "array[int]", "array[int]"]
#: What a record costs on disk besides its item's size, roughly (header, ids, numbers).
RECORD_OVERHEAD = 64


class _RefQueue(QueueState):
    """One user's queued items, as arrays from ``head`` on."""

    __slots__ = ("offsets", "seqs", "serials", "sizes")

    def __init__(self) -> None:
        super().__init__()
        self.seqs = array("q")
        self.serials = array("i")
        self.offsets = array("q")
        self.sizes = array("i")

    def arrays(self) -> Arrays:
        """The queued items' arrays (copies)."""
        head = self.head
        return self.seqs[head:], self.serials[head:], self.offsets[head:], self.sizes[head:]

    def find(self, seq: int) -> int | None:
        """Where item ``seq`` is in the arrays, if queued."""
        seqs = self.seqs
        at = bisect.bisect_left(seqs, seq, self.head)
        return at if at < len(seqs) and seqs[at] == seq else None


class RefIndex(BaseIndex[_RefQueue]):
    """Per-user queues of references to records on disk, and the message-id memory.

    Args:
        read: Reads items back (synchronously), for :meth:`users`: given a user and
            references, the entries, in order (those unreadable left out).
        dedup_window, dedup_max, max_unread: As for :class:`~._index.BaseIndex`.
    """

    def __init__(self, *, read: Callable[[str, Sequence[Ref]], list[Entry]],
                 dedup_window: float = 86400.0, dedup_max: int = 1_000_000,
                 max_unread: int = 10_000) -> None:
        super().__init__(dedup_window=dedup_window, dedup_max=dedup_max,
                         max_unread=max_unread)
        self._read = read
        #: Per segment serial: [queued items in it, their bytes on disk, roughly].
        self.usage: dict[int, list[int]] = {}

    def _queue(self, user: str) -> _RefQueue:
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = _RefQueue()
        return queue

    def _use(self, serial: int, items: int, size: int) -> None:
        usage = self.usage.get(serial)
        if usage is None:
            usage = self.usage[serial] = [0, 0]
        usage[0] += items
        usage[1] += size + items * RECORD_OVERHEAD
        if not usage[0]:
            del self.usage[serial]

    # -- adding and moving ---------------------------------------------------------------

    def add(self, user: str, seq: int, position: tuple[int, int], size: int,
            receipt: bool) -> None:
        """Queue item ``seq`` of ``user``, of ``size`` bytes, whose record is at
        ``position`` (a :class:`Position`, or a plain (segment, offset) pair)."""
        queue = self._queue(user)
        seqs = queue.seqs
        segment, offset = position
        flagged = size * 2 + receipt
        if seqs and seqs[-1] > seq:
            at = bisect.bisect_left(seqs, seq, queue.head)
            seqs.insert(at, seq)
            queue.serials.insert(at, segment)
            queue.offsets.insert(at, offset)
            queue.sizes.insert(at, flagged)
        else:
            seqs.append(seq)
            queue.serials.append(segment)
            queue.offsets.append(offset)
            queue.sizes.append(flagged)
        if seq > queue.last_seq:
            queue.last_seq = seq
        if seq > queue.reserved:
            queue.reserved = seq
        self.pending_total += 1
        self.pending_bytes += size
        usage = self.usage.get(segment)  # _use, written out: every write's path
        if usage is None:
            usage = self.usage[segment] = [0, 0]
        usage[0] += 1
        usage[1] += size + RECORD_OVERHEAD

    def restore(self, user: str, arrays: Arrays) -> None:
        """Queue the items of a checkpoint's ``CK_REFS`` record (after any already queued)."""
        queue = self._queue(user)
        seqs, serials, offsets, sizes = arrays
        queue.seqs.extend(seqs)
        queue.serials.extend(serials)
        queue.offsets.extend(offsets)
        queue.sizes.extend(sizes)
        if seqs:
            queue.last_seq = max(queue.last_seq, seqs[-1])
            queue.reserved = max(queue.reserved, seqs[-1])
        self.pending_total += len(seqs)
        for serial, flagged in zip(serials, sizes, strict=True):
            self._use(serial, 1, flagged >> 1)
            self.pending_bytes += flagged >> 1

    def move(self, user: str, seq: int, old: Position, new: Position) -> bool:
        """Point item ``seq`` of ``user`` at ``new`` if it is still queued at ``old``."""
        queue = self._queues.get(user)
        at = queue.find(seq) if queue is not None else None
        if queue is None or at is None or (queue.serials[at], queue.offsets[at]) != (
                old.segment, old.offset):
            return False
        size = queue.sizes[at] >> 1
        self._use(old.segment, -1, -size)
        self._use(new.segment, 1, size)
        queue.serials[at], queue.offsets[at] = new.segment, new.offset
        return True

    def replace(self, user: str, arrays: Arrays) -> None:
        """Make ``user``'s queued items exactly ``arrays`` (after a checkpoint rewrote
        them: the items it could not read are dropped)."""
        queue = self._queues[user]
        for serial, flagged in zip(queue.serials[queue.head:], queue.sizes[queue.head:],
                                   strict=True):
            self._use(serial, -1, -(flagged >> 1))
            self.pending_bytes -= flagged >> 1
        self.pending_total -= len(queue.seqs) - queue.head
        queue.seqs, queue.serials, queue.offsets, queue.sizes = (array(a.typecode) for a in (
            queue.seqs, queue.serials, queue.offsets, queue.sizes))
        queue.head = 0
        self.restore(user, arrays)

    # -- reading ------------------------------------------------------------------------

    def refs(self, user: str, after: int, limit: int) -> list[Ref]:
        """Where up to ``limit`` queued items with ``seq > after`` are, in order."""
        queue = self._queues.get(user)
        if queue is None:
            return []
        start = bisect.bisect_right(queue.seqs, after, queue.head)
        end = min(len(queue.seqs), start + limit)
        return list(zip(queue.seqs[start:end], queue.serials[start:end],
                        queue.offsets[start:end], strict=True))

    def ref(self, user: str, seq: int) -> Ref | None:
        """Where item ``seq`` of ``user`` is, or None if it is not queued."""
        queue = self._queues.get(user)
        at = queue.find(seq) if queue is not None else None
        if queue is None or at is None:
            return None
        return seq, queue.serials[at], queue.offsets[at]

    def message_refs(self, user: str, upto: int) -> list[Ref]:
        """Where the queued messages (not receipts) with ``seq <= upto`` are, in order."""
        queue = self._queues.get(user)
        if queue is None:
            return []
        head, sizes = queue.head, queue.sizes
        end = bisect.bisect_right(queue.seqs, upto, head)
        return [(queue.seqs[at], queue.serials[at], queue.offsets[at])
                for at in range(head, end) if not sizes[at] & 1]

    def queued(self, user: str) -> int:
        """How many items wait in ``user``'s queue."""
        queue = self._queues.get(user)
        return len(queue.seqs) - queue.head if queue else 0

    def holds(self, user: str, seq: int) -> bool:
        """Whether ``user``'s queue holds the item ``seq`` (queued, not acknowledged)."""
        queue = self._queues.get(user)
        return queue is not None and queue.find(seq) is not None

    def waiting(self) -> list[str]:
        """The users whose queue holds items (one pass over every user)."""
        return [user for user, queue in self._queues.items() if len(queue.seqs) > queue.head]

    def in_segment(self, serial: int) -> list[tuple[str, int, int, int]]:
        """The queued items whose record is in segment ``serial``: (user, seq, offset,
        size)."""
        found = []
        for user, queue in self._queues.items():
            serials = queue.serials
            try:
                first = serials.index(serial, queue.head)
            except ValueError:
                continue
            for at in range(first, len(serials)):
                if serials[at] == serial:
                    found.append((user, queue.seqs[at], queue.offsets[at], queue.sizes[at] >> 1))
        return found

    # -- acknowledgements ---------------------------------------------------------------

    def plan_ack(self, user: str, status: str, upto: int, peer: str | None, ts: int,
                 newly: Newly) -> Acked:
        """What an acknowledgement would change, without changing anything (see
        :meth:`~._index.QueueIndex.plan_ack`).

        Args:
            newly: The messages it removes (:meth:`message_refs`, read back).
        """
        queue = self._queues.get(user)
        if queue is None:
            return Acked(False, ())
        end = bisect.bisect_right(queue.seqs, upto, queue.head)
        receipts = plan_receipts(user, status, upto, peer, ts, newly, queue.unread,
                                 self._max_unread)
        read = any(receipt.status == "read" for _, receipt in receipts)
        return Acked(end > queue.head or read, receipts)

    def apply_ack(self, user: str, status: str, upto: int, peer: str | None,
                  newly: Newly | None, resolve: Callable[[str, list[Ref]], Newly]
                  ) -> Sequence[int]:
        """Make the change :meth:`plan_ack` describes.

        Args:
            newly: The messages the plan found leaving; None at recovery.
            resolve: Reads back the sender and id of messages leaving that ``newly`` does
                not have (at recovery, all of them; at run time, one that was queued
                between the plan and now, which only an acknowledgement of a seq not yet
                delivered meets).

        Returns:
            The seqs of the items removed.
        """
        queue = self._queues.get(user)
        if queue is None:
            return ()
        head = queue.head
        end = bisect.bisect_right(queue.seqs, upto, head)
        leaving = self.message_refs(user, upto)
        if newly is None or [seq for seq, _, _ in newly] != [seq for seq, _, _ in leaving]:
            known = {message[0]: message for message in newly or ()}
            known.update((message[0], message) for message in resolve(
                user, [ref for ref in leaving if ref[0] not in known]))
            newly = [known[seq] for seq, _, _ in leaving if seq in known]
        for serial, flagged in zip(queue.serials[head:end], queue.sizes[head:end],
                                   strict=True):
            self._use(serial, -1, -(flagged >> 1))
            self.pending_bytes -= flagged >> 1
        self.pending_total -= end - head
        removed = queue.seqs[head:end]
        if end > 1024 and end * 2 > len(queue.seqs):
            for values in (queue.seqs, queue.serials, queue.offsets, queue.sizes):
                del values[:end]
            end = 0
        queue.head = end
        queue.acked = max(queue.acked, min(upto, queue.last_seq))
        apply_ack(status, upto, peer, newly, queue.unread, self._max_unread)
        return removed

    # -- snapshots ----------------------------------------------------------------------

    def queues(self) -> Iterator[tuple[str, int, list[tuple[int, str, str]], int, Arrays]]:
        """Every user's (user, last_seq, unread [seq, sender, id], acked, queued items)."""
        for user, queue in self._queues.items():
            yield user, queue.last_seq, self._unread(queue), queue.acked, queue.arrays()

    def users(self) -> Iterator[tuple[str, int, Sequence[Entry], list[tuple[int, str, str]],
                                      int]]:
        """Every user's (user, last_seq, pending entries, unread [seq, sender, id], acked),
        as :meth:`~._index.QueueIndex.users` gives them: the entries are read back from
        disk, synchronously (for tests and tools, not for a store that serves)."""
        for user, last_seq, unread, acked, (seqs, serials, offsets, _) in self.queues():
            refs = list(zip(seqs, serials, offsets, strict=True))
            yield user, last_seq, self._read(user, refs) if refs else [], unread, acked
