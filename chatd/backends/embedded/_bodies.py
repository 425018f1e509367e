"""Queued items read back from disk, through a small bounded cache.

The durable store keeps only where each queued item is (:mod:`._refs`). To stream a
backlog, or to learn the sender and id of the messages an acknowledgement removes, it reads
the items back: :class:`Bodies` reads each record with ``pread`` at its position on the
first replica, checks its CRC and that it holds the item asked for, and, if not (an I/O
error, a missing file, damage), at the same position on the second replica, where the
journal wrote the same record. It tells the caller which replicas failed for which item;
the store decides what that means (the ``replica_unreadable`` alarm, or a reference that
went stale while the read ran).

The :class:`BodyCache` keeps the items most recently read or written, at most
:data:`CACHE_ITEMS` of them and :data:`CACHE_BYTES` bytes of their content (least recently
used first out): an acknowledgement of a message delivered live, or of a batch just
streamed, finds the sender and id there without a read.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

import cbor2
import trio

from chatd.backends._records import Entry, Message

from ._format import item_in, item_size
from ._refs import Ref
from ._segments import Position, SegmentReader

__all__ = ["CACHE_BYTES", "CACHE_ITEMS", "Bodies", "BodyCache", "Read"]

#: Most items the cache holds.
CACHE_ITEMS = 4096
#: Most bytes of content (bodies, receipts' ids) the cache holds.
CACHE_BYTES = 4 * 1024 * 1024

#: An item read back, or None if no replica gave it; and which replicas failed for it
#: (bit ``1 << replica``).
Read = tuple[Entry | None, int]


class BodyCache:
    """The items most recently read or written, by (user, seq), least recently used out
    first.

    Args:
        items: Most items held.
        size: Most bytes of content held (an item larger than this is not held).
    """

    def __init__(self, items: int = CACHE_ITEMS, size: int = CACHE_BYTES) -> None:
        self.max_items = items
        self.max_bytes = size
        self.bytes = 0
        self._items: collections.OrderedDict[tuple[str, int], tuple[Entry, int]] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, user: str, seq: int) -> Entry | None:
        """The cached item ``seq`` of ``user``, or None."""
        held = self._items.get((user, seq))
        if held is None:
            return None
        self._items.move_to_end((user, seq))
        return held[0]

    def put(self, user: str, entry: Entry, size: int | None = None) -> None:
        """Hold ``entry`` of ``user``'s queue, dropping the least recently used past the
        bounds; ``size`` is its :func:`item_size` if the caller has it already."""
        if size is None:
            size = item_size(entry.item)
        if size > self.max_bytes:
            return
        items, key = self._items, (user, entry.seq)
        old = items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        items[key] = (entry, size)
        self.bytes += size
        while len(items) > self.max_items or self.bytes > self.max_bytes:
            self.bytes -= items.popitem(last=False)[1][1]

    def forget(self, user: str, seqs: Sequence[int]) -> None:
        """Drop items of ``user`` (acknowledged: nobody reads them again)."""
        items = self._items
        for seq in seqs:
            held = items.pop((user, seq), None)
            if held is not None:
                self.bytes -= held[1]

    def clear(self) -> None:
        """Drop everything (the store restarts with a new index)."""
        self._items.clear()
        self.bytes = 0


class Bodies:
    """Reads queued items back from the replicas, through a :class:`BodyCache`.

    Args:
        directories: The replica directories, in the order they are tried.
        cache: The cache of recent items.
        max_record: Largest record payload believed.
    """

    def __init__(self, directories: Sequence[Path], cache: BodyCache, *,
                 max_record: int = 1024 * 1024) -> None:
        self.directories = list(directories)
        self.cache = cache
        self.max_record = max_record

    def read_now(self, user: str, refs: Sequence[Ref]) -> list[Read]:
        """Read items of ``user`` from disk, blocking (in a worker thread, or before the
        store serves); the cache is neither consulted nor filled."""
        readers = [SegmentReader(d, max_record=self.max_record) for d in self.directories]
        try:
            return [_read_one(readers, user, ref) for ref in refs]
        finally:
            for reader in readers:
                reader.close()

    async def read(self, user: str, refs: Sequence[Ref]) -> list[Read]:
        """Read items of ``user``: from the cache, the others from disk in a worker thread
        (then cached)."""
        results: list[Read | None] = []
        missing: list[Ref] = []
        for ref in refs:
            entry = self.cache.get(user, ref[0])
            results.append((entry, 0) if entry is not None else None)
            if entry is None:
                missing.append(ref)
        if not missing:
            return [result for result in results if result is not None]
        found = iter(await trio.to_thread.run_sync(self.read_now, user, missing))
        out = []
        for result in results:
            if result is None:
                result = next(found)
                if result[0] is not None:
                    self.cache.put(user, result[0])
            out.append(result)
        return out


    def messages_now(self, user: str, refs: Sequence[Ref]) -> list[tuple[int, str, str]]:
        """The (seq, sender, id) of messages of ``user``: from the cache, the others read
        from disk, blocking (at recovery; at run time only for the rare message
        :meth:`~._refs.RefIndex.apply_ack` must resolve). Those unreadable are left out."""
        found: list[tuple[int, str, str]] = []
        missing = []
        for ref in refs:
            entry = self.cache.get(user, ref[0])
            if entry is None:
                missing.append(ref)
            elif isinstance(entry.item, Message):
                found.append((entry.seq, entry.item.sender, entry.item.id))
        for entry, _ in self.read_now(user, missing) if missing else ():
            if entry is not None and isinstance(entry.item, Message):
                found.append((entry.seq, entry.item.sender, entry.item.id))
        return sorted(found)


def _read_one(readers: Sequence[SegmentReader], user: str, ref: Ref) -> Read:
    """Item ``ref`` of ``user`` from the first replica that gives it."""
    seq, serial, offset = ref
    failed = 0
    for replica, reader in enumerate(readers):
        try:
            record_type, payload = reader.read(Position(serial, offset))
            fields = cbor2.loads(payload)
            item = item_in(record_type, fields, user, seq) if isinstance(fields, list) else None
        except Exception:  # RecordUnreadable, or a record not what it should be
            item = None
        if item is not None:
            return Entry(seq, item), failed
        failed |= 1 << replica
    return None, failed
