"""State records of the embedded engine: buckets in memory, journaled when durable.

A :class:`KVTable` holds every bucket's records in memory; every method is synchronous and
does no I/O. A bucket that is not durable (:class:`MemoryBucket`) changes the table at
once. A durable bucket of the durable store (:class:`DurableBucket`) first writes a ``KV``
record to both replicas through the journal and changes the table once it is fsync'd, as
queues do; the store's checkpoints carry every durable bucket's records.

A record that has expired reads as absent and is dropped on the next write of its key, on
a sweep (:meth:`KVTable.sweep`) or at recovery.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any

import trio

from chatd.backends._interfaces import BucketSpec
from chatd.backends._records import RevisionMismatch, Versioned
from chatd.clock import now_ms

__all__ = ["Commit", "DurableBucket", "KVTable", "MemoryBucket"]

#: A record as the table keeps it: (value, revision, expiry in ms or 0 for none).
_Record = tuple[bytes, int, int]
#: Writes records ``(bucket, key, value or None, revision, expires)`` durably, in one
#: write, then calls ``apply``.
Commit = Callable[[Sequence[tuple[str, str, bytes | None, int, int]], Callable[[], None]],
                  Awaitable[None]]


class KVTable:
    """Every bucket's records and revision counter, in memory."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, _Record]] = {}
        self._revisions: dict[str, int] = {}
        self._reserved: dict[str, int] = {}

    def clear(self) -> None:
        """Forget everything (before recovery rebuilds the table)."""
        self._records.clear()
        self._revisions.clear()
        self._reserved.clear()

    def get(self, bucket: str, key: str, now: int) -> Versioned | None:
        """The live record of ``key``, or None."""
        record = self._records.get(bucket, {}).get(key)
        if record is None or (record[2] and record[2] <= now):
            return None
        return Versioned(key, record[0], record[1])

    def reserve(self, bucket: str) -> int:
        """A new revision of ``bucket`` for a write (never given twice; a failed write
        leaves a gap)."""
        revision = max(self._reserved.get(bucket, 0), self._revisions.get(bucket, 0)) + 1
        self._reserved[bucket] = revision
        return revision

    def apply(self, bucket: str, key: str, value: bytes | None, revision: int,
              expires: int) -> None:
        """Set (or with ``value`` None, remove) ``key`` as written at ``revision``."""
        self._revisions[bucket] = max(self._revisions.get(bucket, 0), revision)
        records = self._records.setdefault(bucket, {})
        if value is None:
            records.pop(key, None)
        else:
            records[key] = (value, revision, expires)

    def restore_revision(self, bucket: str, revision: int) -> None:
        """Set ``bucket``'s revision counter from a checkpoint (it only grows)."""
        self._revisions[bucket] = max(self._revisions.get(bucket, 0), revision)

    def check(self, bucket: str, key: str, expected: int | None, now: int) -> None:
        """Raise unless ``key``'s revision is ``expected`` (0: no live record).

        Raises:
            RevisionMismatch: It is not.
        """
        if expected is None:
            return
        current = self.get(bucket, key, now)
        found = current.revision if current is not None else 0
        if found != expected:
            raise RevisionMismatch(f"{bucket}/{key} is at revision {found}, not {expected}")

    def sweep(self, now: int) -> None:
        """Forget every expired record."""
        for records in self._records.values():
            for key in [k for k, (_, _, expires) in records.items() if expires and expires <= now]:
                del records[key]

    def dump(self, bucket: str) -> tuple[int, list[list[Any]]]:
        """A bucket's revision counter and live records ``[key, value, revision, expires]``."""
        now = now_ms()
        records = [[key, value, revision, expires]
                   for key, (value, revision, expires) in self._records.get(bucket, {}).items()
                   if not expires or expires > now]
        return self._revisions.get(bucket, 0), records

    def count(self) -> int:
        """How many records every bucket holds together (expired ones included)."""
        return sum(len(records) for records in self._records.values())

    def buckets(self) -> Iterator[str]:
        """The names of the buckets written so far."""
        return iter(list(self._revisions))


def _expires(ttl: float | None, now: int) -> int:
    if ttl is None:
        return 0
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, not {ttl}")
    return now + int(ttl * 1000)


class MemoryBucket:
    """A bucket in process memory: every write is applied at once."""

    def __init__(self, spec: BucketSpec, table: KVTable) -> None:
        self.spec = spec
        self._table = table

    async def get(self, key: str) -> Versioned | None:
        """The record of ``key``; see :meth:`chatd.backends.Bucket.get`."""
        return self._table.get(self.spec.name, key, now_ms())

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key``; see :meth:`chatd.backends.Bucket.put`."""
        return self._write(key, value, None, ttl)

    async def put_many(self, records: Sequence[tuple[str, bytes]], *,
                       ttl: float | None = None) -> list[int]:
        """Write several keys; see :meth:`chatd.backends.Bucket.put_many`."""
        return [self._write(key, value, None, ttl) for key, value in records]

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` if absent; see :meth:`chatd.backends.Bucket.create`."""
        return self._write(key, value, 0, ttl)

    async def update(self, key: str, value: bytes, revision: int, *,
                     ttl: float | None = None) -> int:
        """Write ``key`` at ``revision``; see :meth:`chatd.backends.Bucket.update`."""
        return self._write(key, value, revision, ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key``; see :meth:`chatd.backends.Bucket.delete`."""
        self._write(key, None, revision, None)

    def _write(self, key: str, value: bytes | None, expected: int | None,
               ttl: float | None) -> int:
        now = now_ms()
        name = self.spec.name
        self._table.check(name, key, expected, now)
        revision = self._table.reserve(name)
        self._table.apply(name, key, value, revision, _expires(ttl, now))
        return revision


class DurableBucket(MemoryBucket):
    """A bucket of the durable store: a write is fsync'd on both replicas before it shows.

    Writes of one key are serialized, so a compare-and-set holds across the fsync: a write
    claims its keys, all at once, once no other write holds any of them (so two writes of
    several keys never wait for each other in a cycle). A claim is a mark in a dict, not a
    lock per key: trio keeps, per task, a list of the locks it holds and removes each one
    released from it, so a task holding a lock for each of thousands of keys (the
    presence service writing every user's last-seen time) spent its time in those lists.
    Waiting writers are not served in order; each tries again when a claim ends.
    """

    def __init__(self, spec: BucketSpec, table: KVTable, commit: Commit) -> None:
        super().__init__(spec, table)
        self._commit = commit
        #: Keys being written, each with the event set when that write ends.
        self._claims: dict[str, trio.Event] = {}

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` durably; see :meth:`chatd.backends.Bucket.put`."""
        return await self._durable_write(key, value, None, ttl)

    async def put_many(self, records: Sequence[tuple[str, bytes]], *,
                       ttl: float | None = None) -> list[int]:
        """Write several keys durably in one journal write; see
        :meth:`chatd.backends.Bucket.put_many`."""
        name, table = self.spec.name, self._table
        latest = dict(records)  # one record per key: the last value given
        async with self._claimed(latest):
            now = now_ms()
            expires = _expires(ttl, now)
            written = {key: table.reserve(name) for key in latest}

            def apply() -> None:
                for key, value in latest.items():
                    table.apply(name, key, value, written[key], expires)

            await self._commit(
                [(name, key, value, written[key], expires) for key, value in latest.items()],
                apply)
        return [written[key] for key, _ in records]

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` durably if absent; see :meth:`chatd.backends.Bucket.create`."""
        return await self._durable_write(key, value, 0, ttl)

    async def update(self, key: str, value: bytes, revision: int, *,
                     ttl: float | None = None) -> int:
        """Write ``key`` durably at ``revision``; see :meth:`chatd.backends.Bucket.update`."""
        return await self._durable_write(key, value, revision, ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key`` durably; see :meth:`chatd.backends.Bucket.delete`."""
        await self._durable_write(key, None, revision, None)

    async def _durable_write(self, key: str, value: bytes | None, expected: int | None,
                             ttl: float | None) -> int:
        async with self._claimed((key,)):
            now = now_ms()
            name, table = self.spec.name, self._table
            table.check(name, key, expected, now)
            revision = table.reserve(name)
            expires = _expires(ttl, now)
            await self._commit([(name, key, value, revision, expires)],
                               lambda: table.apply(name, key, value, revision, expires))
            return revision

    @contextlib.asynccontextmanager
    async def _claimed(self, keys: Collection[str]) -> AsyncIterator[None]:
        """Claim ``keys`` for a write: wait until no other write holds any of them, then
        hold them all until the block ends."""
        claims = self._claims
        while True:
            held = next((claims[key] for key in keys if key in claims), None)
            if held is None:
                break
            await held.wait()
        done = trio.Event()
        for key in keys:
            claims[key] = done
        try:
            yield
        finally:
            for key in keys:
                del claims[key]
            done.set()
