"""The durable store's checkpoints: the records that restore its whole state at one LSN.

A checkpoint is built in the journal's task between two batches (``Journal.checkpoint``),
from the index exactly as it is at that LSN, and written as one run of records between a
``CK_BEGIN`` and a ``CK_END`` (docs/storage.md, "Checkpoints"). Two kinds:

- :func:`index_records`: each user's counters and unread messages, where each queued item
  is (``CK_REFS``: packed arrays, 24 bytes an item), the message-id memory and the durable
  buckets. No item is copied: the records that hold them stay where they are. This is what
  the store writes in the background.
- :func:`full_records`: the same, but with every queued item copied into the checkpoint
  (``CK_ENTRY``), written into a fresh segment, after which every older segment is deleted.
  This is how a repair makes both replicas identical; it reads every queued item first
  (:func:`read_queues`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from chatd.backends._records import Entry

from ._format import CK_BEGIN, CK_END, REFS_CHUNK, RecordType, entry_fields, pack_refs
from ._journal import Body
from ._kv import KVTable
from ._refs import Arrays, Ref, RefIndex
from ._segments import Position

__all__ = ["FullCheckpoint", "full_records", "index_records", "read_queues"]

#: Most ids, unread messages or state records in one checkpoint record.
_CHUNK = 1000


def index_records(index: RefIndex, kv: KVTable, snap: int) -> list[Body]:
    """A checkpoint of ``index`` and ``kv`` covering LSN ``snap``, queued items by
    reference."""
    records: list[Body] = [(CK_BEGIN, [snap])]
    for user, last_seq, unread, acked, arrays in index.queues():
        records += _user_records(snap, user, last_seq, unread, acked)
        for start in range(0, len(arrays[0]), REFS_CHUNK):
            chunk = [values[start:start + REFS_CHUNK] for values in arrays]
            records.append((RecordType.CK_REFS, [snap, user, *pack_refs(*chunk)]))
    return _end(records, snap, index, kv)


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
    records: list[Body] = [(CK_BEGIN, [snap])]
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
    return FullCheckpoint(_end(records, snap, index, kv), kept, lost)


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


def _end(records: list[Body], snap: int, index: RefIndex, kv: KVTable) -> list[Body]:
    """``records`` followed by the message-id memory, the durable buckets and the end."""
    ids: list[list[Any]] = [[sender, msg_id, to, ts]
                            for (sender, msg_id), (to, ts, _) in index.ids.items()]
    for start in range(0, len(ids), _CHUNK):
        records.append((RecordType.CK_IDS, [snap, ids[start:start + _CHUNK]]))
    for bucket in kv.buckets():
        revision, state = kv.dump(bucket)
        for start in range(0, max(1, len(state)), _CHUNK):
            records.append((RecordType.CK_KV, [snap, bucket, revision,
                                               state[start:start + _CHUNK]]))
    # The count lets recovery tell a complete checkpoint from one with a damaged record.
    records.append((CK_END, [snap, len(records) - 1]))
    return records
