"""The message ids a store remembers for duplicate detection, in about 32 bytes an id.

A sender's ``send`` is idempotent: the same (sender, id) within ``dedup_window`` is answered
``dup`` with the first one's ``ts``, and the id used again for another recipient is refused
(``id_conflict``). The store therefore remembers, for up to ``dedup_max_ids`` ids, oldest
first: which recipient each went to and its ``ts``.

:class:`IdMemory` keeps no object per id. A (sender, id) is known by a 64-bit key, the
first eight bytes of its BLAKE2b digest (:func:`id_key`, the same in every process, so
checkpoints can hold keys); the ids live in a ring of arrays in the order they were
remembered (key, ``ts``, and the recipient as a reference to one shared string per user);
and an open-addressing table of 32-bit ring positions, twice the ring's size, finds a key.
Forgetting is always of the oldest id, whose slot in the table is emptied by moving back
the entries after it (linear probing's deletion without tombstones), so lookups stay short
however long the store runs.

Two different (sender, id) pairs with the same key would be taken for one: the second
would be answered ``dup`` (or ``id_conflict``) and not stored. With a million ids
remembered the chance that a given new id meets an existing key is about 1 in 2^44
(1.8e13); docs/protocol.md says so.

The table is an anonymous memory map, so its pages take memory only once used: 8 bytes
per id the ring can hold at most (16 MiB at the default 1,000,000), plus 24 bytes per id
remembered.
"""

from __future__ import annotations

import hashlib
import mmap
import sys
from array import array
from collections.abc import Iterable, Iterator

__all__ = ["IdMemory", "id_key"]

#: Bytes of a (sender, id) pair's digest kept as its key.
KEY_BYTES = 8


def id_key(sender: str, msg_id: str) -> int:
    """The 64-bit key of a sender's message id (a signed integer, as ``array('q')``
    holds it)."""
    digest = hashlib.blake2b(f"{sender}\x00{msg_id}".encode(), digest_size=KEY_BYTES).digest()
    return int.from_bytes(digest, "little", signed=True)


class IdMemory:
    """Remembered message ids, oldest first, at most ``capacity`` of them.

    Args:
        capacity: Most ids remembered at once (``dedup_max_ids``).
        window_ms: How long an id is remembered after its message's ``ts``
            (``dedup_window``), in milliseconds.
    """

    __slots__ = ("_count", "_head", "_keys", "_mask", "_table", "_tos", "_tss", "capacity",
                 "window_ms")

    def __init__(self, capacity: int, window_ms: int) -> None:
        if not 0 < capacity < 2**31:
            raise ValueError(f"capacity must be from 1 to 2^31 - 1, not {capacity}")
        self.capacity = capacity
        self.window_ms = window_ms
        size = 1 << max(4, (2 * capacity - 1).bit_length())
        self._mask = size - 1
        #: Ring position + 1 of the id whose key probes here; 0 for an empty slot.
        self._table = memoryview(mmap.mmap(-1, size * 4)).cast("I")
        self._keys = array("q")
        self._tss = array("q")
        self._tos: list[str] = []
        self._head = 0  # ids forgotten so far: the oldest is at ring position head % capacity
        self._count = 0  # ids remembered so far

    def __len__(self) -> int:
        """How many ids are remembered now."""
        return self._count - self._head

    def get(self, key: int) -> tuple[str, int, int] | None:
        """The recipient, ``ts`` and expiry (ms) of the id with ``key``, or None."""
        held = self._table[self._probe(key)]
        if not held:
            return None
        ts = self._tss[held - 1]
        return self._tos[held - 1], ts, ts + self.window_ms

    def add(self, key: int, to: str, ts: int) -> None:
        """Remember an id (its recipient and ``ts`` replaced if it is already), forgetting
        the oldest if ``capacity`` are remembered."""
        at = self._probe(key)
        if held := self._table[at]:
            self._tos[held - 1], self._tss[held - 1] = sys.intern(to), ts
            return
        if len(self) == self.capacity:
            self._forget_oldest()  # which may move the run's entries back: probe again
            at = self._probe(key)
        slot = self._count % self.capacity
        if slot == len(self._keys):
            self._keys.append(key)
            self._tss.append(ts)
            self._tos.append(sys.intern(to))
        else:
            self._keys[slot], self._tss[slot], self._tos[slot] = key, ts, sys.intern(to)
        self._table[at] = slot + 1
        self._count += 1

    def forget(self, now: int) -> None:
        """Forget the ids whose window ended before ``now`` (ms), oldest first."""
        limit = now - self.window_ms
        tss, capacity = self._tss, self.capacity
        while self._count > self._head and tss[self._head % capacity] < limit:
            self._forget_oldest()

    def items(self) -> Iterator[tuple[int, str, int]]:
        """Every remembered id's (key, recipient, ``ts``), oldest first."""
        keys, tss, tos = self.arrays()
        return zip(keys, tos, tss, strict=True)

    def arrays(self) -> tuple[array[int], array[int], list[str]]:
        """Copies of every remembered id's key, ``ts`` and recipient, oldest first (for a
        checkpoint)."""
        count, start = len(self), self._head % self.capacity
        if start + count <= len(self._keys):
            end = start + count
            return self._keys[start:end], self._tss[start:end], self._tos[start:end]
        wrap = start + count - len(self._keys)
        return (self._keys[start:] + self._keys[:wrap], self._tss[start:] + self._tss[:wrap],
                self._tos[start:] + self._tos[:wrap])

    def extend(self, keys: Iterable[int], tss: Iterable[int], tos: Iterable[str]) -> None:
        """Remember ids in the order given (a checkpoint's, oldest first)."""
        for key, ts, to in zip(keys, tss, tos, strict=True):
            self.add(key, to, ts)

    def _probe(self, key: int) -> int:
        """Where in the table the id with ``key`` is or, if it is not remembered, the empty
        slot that ends its run (a run has no gaps: see :meth:`_forget_oldest`)."""
        table, keys, mask = self._table, self._keys, self._mask
        at = key & mask
        while (held := table[at]) and keys[held - 1] != key:
            at = (at + 1) & mask
        return at

    def _forget_oldest(self) -> None:
        """Forget the oldest id: empty its table slot, moving back each entry after it that
        could not be found past the gap otherwise."""
        slot = self._head % self.capacity
        table, keys, mask = self._table, self._keys, self._mask
        gap = keys[slot] & mask
        while table[gap] != slot + 1:
            gap = (gap + 1) & mask
        at = gap
        while True:
            at = (at + 1) & mask
            held = table[at]
            if not held:
                break
            home = keys[held - 1] & mask
            # The entry at `at` stays unless its home is outside (gap, at], cyclically.
            if (gap < at and (home <= gap or home > at)) or (gap > at and home <= gap
                                                             and home > at):
                table[gap] = held
                gap = at
        table[gap] = 0
        self._tos[slot] = ""
        self._head += 1
