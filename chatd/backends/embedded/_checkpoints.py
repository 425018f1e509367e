"""The durable store's checkpoints: the records that restore its whole state at one LSN.

A checkpoint holds the index exactly as it is at one LSN, and is written as one run of
records between the journal's ``CK_BEGIN`` and a ``CK_END`` (docs/storage.md,
"Checkpoints"). Two kinds:

- Of the index, which the store writes in the background: each user's counters and unread
  messages, where each queued item is (``CK_REFS``: packed arrays, 24 bytes an item), the
  message-id memory and the durable buckets. No item is copied: the records that hold them
  stay where they are. Taking it must not stop the node: :func:`copy_index` copies the
  state at once (lists and arrays copied in C, no encoding), then :func:`encode_index`
  encodes the copy a record at a time, letting every other task run in between, while the
  journal goes on writing.
- :func:`full_records`: the same, but with every queued item copied into the checkpoint
  (``CK_ENTRY``), built in the journal's task between two batches and written into a fresh
  segment, after which every older segment is deleted. This is how a repair makes both
  replicas identical; it reads every queued item first (:func:`read_queues`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import cbor2
import trio

from chatd.backends._records import Entry

from ._format import (
    CK_END,
    KEYS_CHUNK,
    REFS_CHUNK,
    RecordType,
    entry_fields,
    pack_arrays,
    pack_refs,
)
from ._journal import Body
from ._kv import KVTable
from ._refs import Arrays, Ref, RefIndex
from ._segments import Position

__all__ = ["FullCheckpoint", "IndexCopy", "copy_index", "encode_index", "full_records",
           "read_queues"]

#: Most unread messages or state records in one checkpoint record.
_CHUNK = 1000


@attrs.frozen
class IndexCopy:
    """The index and the durable buckets as they were at one moment: each user's (user,
    last_seq, unread, acked, queued items' arrays), the remembered ids (keys, ts,
    recipients), and each bucket's (name, revision, records)."""

    queues: list[tuple[str, int, list[tuple[int, str, str]], int, Arrays]]
    ids: tuple[array[int], array[int], list[str]]
    buckets: list[tuple[str, int, list[list[Any]]]]


def copy_index(index: RefIndex, kv: KVTable) -> IndexCopy:
    """A copy of ``index`` and ``kv`` as they are now, to encode later."""
    return IndexCopy(list(index.queues()), index.ids.arrays(),
                     [(bucket, *kv.dump(bucket)) for bucket in kv.buckets()])


async def encode_index(copy: IndexCopy, snap: int) -> list[tuple[int, bytes]]:
    """The records of a checkpoint of ``copy`` covering LSN ``snap`` (queued items by
    reference), encoded one at a time with a checkpoint of trio between them."""
    encoded = []
    for record_type, fields in _index_records(copy, snap):
        encoded.append((record_type, cbor2.dumps(fields)))
        await trio.lowlevel.checkpoint()
    return encoded


def _index_records(copy: IndexCopy, snap: int) -> Iterator[Body]:
    count = 0
    for user, last_seq, unread, acked, arrays in copy.queues:
        for record in _user_records(snap, user, last_seq, unread, acked):
            count += 1
            yield record
        for start in range(0, len(arrays[0]), REFS_CHUNK):
            chunk = [values[start:start + REFS_CHUNK] for values in arrays]
            count += 1
            yield RecordType.CK_REFS, [snap, user, *pack_refs(*chunk)]
    for record in _shared(snap, copy.ids, copy.buckets):
        count += 1
        yield record
    # The count lets recovery tell a complete checkpoint from one with a damaged record.
    yield CK_END, [snap, count]


@attrs.frozen
class FullCheckpoint:
    """A checkpoint with every queued item in it, and how to point the index at the copies.

    Attributes:
        records: Its records.
        kept: Per user: where the user's first ``CK_ENTRY`` is in ``records``, and the seqs
            and (doubled, +1 for a receipt) sizes of the items written, in order.
        lost: How many queued items neither replica gave (dropped).
    """

    records: list[Body]
    kept: list[tuple[str, int, list[int], list[int]]]
    lost: int

    def place(self, index: RefIndex, positions: Sequence[Position]) -> None:
        """Point ``index`` at the copies, once the records are at ``positions`` (and drop
        from it the items that were lost)."""
        for user, first, seqs, sizes in self.kept:
            at = positions[first:first + len(seqs)]
            index.replace(user, (array("q", seqs), array("i", [p.segment for p in at]),
                                 array("q", [p.offset for p in at]), array("i", sizes)))


def full_records(index: RefIndex, kv: KVTable, snap: int, read: dict[tuple[str, int], Entry],
                 cached: Callable[[str, int], Entry | None],
                 read_now: Callable[[str, list[Ref]], list[Entry]]) -> FullCheckpoint:
    """A checkpoint of ``index`` and ``kv`` covering LSN ``snap``, every queued item in it.

    Args:
        read: The queued items read beforehand (:func:`read_queues`).
        cached: The cache's item of a user, if any (for items queued since).
        read_now: Reads items of a user from disk (the rest of those queued since).
    """
    records: list[Body] = []
    kept: list[tuple[str, int, list[int], list[int]]] = []
    lost = 0
    for user, last_seq, unread, acked, (seqs, serials, offsets, sizes) in index.queues():
        records += _user_records(snap, user, last_seq, unread, acked)
        entries = [read.get((user, seq)) or cached(user, seq) for seq in seqs]
        late = [(seq, serial, offset) for seq, serial, offset, entry in zip(
            seqs, serials, offsets, entries, strict=True) if entry is None]
        if late:
            found = {entry.seq: entry for entry in read_now(user, late)}
            entries = [entry or found.get(seq) for seq, entry in zip(seqs, entries,
                                                                     strict=True)]
        first, written, flags = len(records), [], []
        for entry, flagged in zip(entries, sizes, strict=True):
            if entry is None:
                lost += 1
                continue
            records.append((RecordType.CK_ENTRY, [snap, user, entry.seq,
                                                  *entry_fields(entry)]))
            written.append(entry.seq)
            flags.append(flagged)
        kept.append((user, first, written, flags))
    records += _shared(snap, index.ids.arrays(),
                       [(bucket, *kv.dump(bucket)) for bucket in kv.buckets()])
    records.append((CK_END, [snap, len(records)]))
    return FullCheckpoint(records, kept, lost)


def read_queues(queues: list[tuple[str, Arrays]],
                read_now: Callable[[str, list[Ref]], list[Entry]]
                ) -> dict[tuple[str, int], Entry]:
    """Every item of ``queues`` (each user's arrays) that a replica gives, by (user, seq).

    Blocking: run in a worker thread.
    """
    read: dict[tuple[str, int], Entry] = {}
    for user, (seqs, serials, offsets, _) in queues:
        refs = list(zip(seqs, serials, offsets, strict=True))
        read.update(((user, entry.seq), entry) for entry in read_now(user, refs))
    return read


def _user_records(snap: int, user: str, last_seq: int, unread: list[tuple[int, str, str]],
                  acked: int) -> list[Body]:
    records: list[Body] = [(RecordType.CK_USER, [snap, user, last_seq, acked])]
    for start in range(0, len(unread), _CHUNK):
        chunk = [list(u) for u in unread[start:start + _CHUNK]]
        records.append((RecordType.CK_UNREAD, [snap, user, chunk]))
    return records


def _shared(snap: int, ids: tuple[array[int], array[int], list[str]],
            buckets: list[tuple[str, int, list[list[Any]]]]) -> Iterator[Body]:
    """The records of the message-id memory and of the durable buckets."""
    keys, tss, tos = ids
    for start in range(0, len(keys), KEYS_CHUNK):
        end = start + KEYS_CHUNK
        yield RecordType.CK_KEYS, [snap, *pack_arrays(keys[start:end], tss[start:end]),
                                   tos[start:end]]
    for bucket, revision, state in buckets:
        for start in range(0, max(1, len(state)), _CHUNK):
            yield RecordType.CK_KV, [snap, bucket, revision, state[start:start + _CHUNK]]
