"""Giving disk space back: deleting the segments nothing needs, and compacting the others.

A segment is *obsolete* once it lies before the segment where the newest checkpoint starts
(recovery no longer reads its changes: the checkpoint covers them) and no queued item is in
it. The :class:`Compactor` deletes obsolete segments from both replicas. A segment before
the checkpoint that still holds queued items, but is more than half dead (their records
take less than half its bytes, as the index estimates them), is *compacted*: its items are
read back and copied forward as ``MOVE`` records, through the journal like any write, in
writes of about :data:`BATCH_BYTES`, at most ``rate`` bytes a second, oldest segment
first; once none is left in it, it is obsolete. An item acknowledged meanwhile is simply
not moved; one queued forever is moved again each time its segment grows mostly dead.

Each round works on the index as it is between journal writes; the index only changes in
the journal's ``apply`` hooks, so a segment found obsolete cannot become needed again
(items are only ever added or moved to the segment being written).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from chatd.backends._records import Entry, StoreUnavailable

from ._format import MOVE, entry_fields
from ._journal import Body, Journal
from ._refs import RECORD_OVERHEAD, Ref, RefIndex
from ._segments import Position

__all__ = ["BATCH_BYTES", "Compactor", "Maintenance", "Segments"]

#: Bytes of queued items (as the index estimates them) copied per journal write.
BATCH_BYTES = 256 * 1024


@attrs.define
class Segments:
    """The segments on either replica, and where the newest checkpoint starts (0: none)."""

    serials: set[int] = attrs.field(factory=set)
    checkpoint: int = 0

    def checkpointed(self, positions: list[Position], boundary: int, *, fresh: bool) -> None:
        """A checkpoint was written at ``positions``; recovery needs no segment before
        ``boundary`` any more. If it started a ``fresh`` segment, those were deleted."""
        if fresh:
            self.serials = {serial for serial in self.serials if serial >= boundary}
        if positions:
            self.serials.add(positions[0].segment)
        self.checkpoint = boundary

    def since_checkpoint(self) -> int:
        """How many segments were started since the newest checkpoint (its own included)."""
        return sum(serial >= self.checkpoint for serial in self.serials)

    def before_checkpoint(self, usage: dict[int, list[int]], *, used: bool) -> list[int]:
        """The segments before the newest checkpoint that hold queued items (``used``) or
        none, in order."""
        return sorted(serial for serial in self.serials
                      if serial < self.checkpoint and (serial in usage) == used)


@attrs.define
class Maintenance:
    """What the store's background work has done, for tests and benchmarks."""

    checkpoints: int = 0
    moved: int = 0
    moved_bytes: int = 0
    deleted: int = 0


class Compactor:
    """Deletes obsolete segments and compacts mostly dead ones.

    Args:
        index: The store's index.
        journal: The store's journal.
        segments: The store's segments.
        entries: Reads items of a user back (the store's, which raises the alarm when a
            replica fails a read).
        directory: The first replica's directory, where segment sizes are looked up.
        rate: Most bytes a second copied.
        stats: Where to count what was done.
    """

    def __init__(self, index: RefIndex, journal: Journal, segments: Segments,
                 entries: Callable[[str, list[Ref]], Awaitable[list[Entry]]],
                 directory: Path, rate: int, stats: Maintenance) -> None:
        self._index = index
        self._journal = journal
        self._segments = segments
        self._entries = entries
        self._directory = directory
        self._rate = rate
        self._stats = stats

    async def delete_obsolete(self) -> None:
        """Delete the segments before the newest checkpoint that hold no queued item.

        Raises:
            StoreUnavailable: A replica failed.
        """
        obsolete = self._segments.before_checkpoint(self._index.usage, used=False)
        if obsolete:
            await self._journal.delete(obsolete)
            self._segments.serials.difference_update(obsolete)
            self._stats.deleted += len(obsolete)

    async def compact(self) -> None:
        """Delete the obsolete segments; compact those more than half dead.

        Raises:
            StoreUnavailable: A replica failed.
        """
        await self.delete_obsolete()
        held = self._segments.before_checkpoint(self._index.usage, used=True)
        if not held:
            return
        sizes = await trio.to_thread.run_sync(self._sizes, held)
        for serial in held:
            usage = self._index.usage.get(serial)
            if usage is not None and usage[1] * 2 <= sizes.get(serial, 0):
                await self._move_out(serial)
        await self.delete_obsolete()

    def _sizes(self, serials: list[int]) -> dict[int, int]:
        """The sizes of those segments present on the first replica."""
        sizes = {}
        for serial in serials:
            try:
                sizes[serial] = os.stat(self._directory / f"{serial:020d}.seg").st_size
            except OSError:
                continue
        return sizes

    async def _move_out(self, serial: int) -> None:
        """Copy every item still queued in segment ``serial`` forward."""
        batch: list[tuple[str, int, int]] = []
        size = 0
        for user, seq, offset, item_bytes in self._index.in_segment(serial):
            batch.append((user, seq, offset))
            size += item_bytes + RECORD_OVERHEAD
            if size >= BATCH_BYTES:
                await self._move(serial, batch, size)
                batch, size = [], 0
        if batch:
            await self._move(serial, batch, size)

    async def _move(self, serial: int, batch: list[tuple[str, int, int]], size: int) -> None:
        """Copy a batch of items of segment ``serial`` forward, then wait so that the
        batch took at least ``size / rate`` seconds."""
        started = trio.current_time()
        index = self._index
        records: list[Body] = []
        moved: list[tuple[str, int, Position]] = []
        by_user: dict[str, list[Ref]] = {}
        for user, seq, offset in batch:
            by_user.setdefault(user, []).append((seq, serial, offset))
        for user, refs in by_user.items():
            try:
                entries = await self._entries(user, refs)
            except StoreUnavailable:
                continue  # readable from neither replica: left where it is (alarm raised)
            for entry in entries:
                ref = index.ref(user, entry.seq)
                if ref is not None and ref[1] == serial:
                    records.append((MOVE, [user, entry.seq, *entry_fields(entry)]))
                    moved.append((user, entry.seq, Position(serial, ref[2])))

        def apply(positions: list[Position]) -> None:
            for (user, seq, old), position in zip(moved, positions, strict=True):
                index.move(user, seq, old, position)
            self._segments.serials.add(positions[0].segment)

        if records:
            await self._journal.write(records, apply)
            self._stats.moved += len(records)
            self._stats.moved_bytes += size
        await trio.sleep_until(started + size / self._rate)
