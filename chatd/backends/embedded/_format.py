"""The records of the durable store: their types, their fields, and the queue items in them.

Every record's payload is a CBOR array whose first field is the record's LSN (a change) or
the LSN its checkpoint covers (docs/storage.md, "Records"):

- ``MSG``  [lsn, to, seq, id, from, body, ts] — a message queued for ``to``;
- ``ACK``  [lsn, user, status, upto, peer, receipts] — an acknowledgement and the receipts
  it queued, [[sender, seq, status, ids, ts], ...], as one record;
- ``KV`` [lsn, bucket, key, value, revision, expires] — a state record written (``value``
  null: removed) in a durable bucket, with its expiry in ms (0: none);
- ``MOVE`` [lsn, user, seq, "m", id, from, body, ts] or [lsn, user, seq, "r", status, by,
  ids, ts] — a queued item copied forward by compaction: from then on it is read here;
- checkpoint records, all carrying the LSN the snapshot covers: ``CK_BEGIN``, ``CK_USER``
  [snap, user, last_seq, acked], ``CK_UNREAD`` [snap, user, [[seq, from, id], ...]],
  ``CK_ENTRY`` [snap, user, seq, "m", id, from, body, ts] or [..., "r", status, by, ids,
  ts], ``CK_REFS`` [snap, user, seqs, serials, offsets, sizes] (where a user's queued items
  are on disk, as packed arrays), ``CK_KEYS`` [snap, keys, tss, [to, ...]] (remembered
  message ids: each one's 64-bit key and ts as packed arrays, and its recipient;
  :mod:`._ids`), ``CK_KV`` [snap, bucket, revision, [[key, value, revision, expires],
  ...]], ``CK_END`` [snap, count of the records between begin and end]. Checkpoints
  written before the keys held the ids themselves, ``CK_IDS`` [snap, [[from, id, to,
  ts], ...]]; recovery still reads them.

Types 3-6 were the replica records of a cluster that chatd no longer has; recovery skips
them with a warning.

A queued item is *in* one record: the ``MSG`` that queued a message, the ``ACK`` that
queued a receipt (one of its receipts), the ``CK_ENTRY`` of a checkpoint that rewrote it,
or the ``MOVE`` that copied it forward. :func:`item_in` reads it back from that record.
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections.abc import Sequence
from typing import Any

from chatd.backends._records import Entry, Item, Message, ReceiptItem

__all__ = [
    "ACK",
    "CHANGES",
    "CHECKPOINTED",
    "CK_BEGIN",
    "CK_END",
    "KEYS_CHUNK",
    "KV",
    "MOVE",
    "MSG",
    "REFS_CHUNK",
    "RETIRED",
    "RecordType",
    "adds",
    "entry_fields",
    "item_in",
    "item_size",
    "pack_arrays",
    "pack_refs",
    "receipt_fields",
    "unpack_keys",
    "unpack_refs",
]


class RecordType(enum.IntEnum):
    """The type of a record in the segment log (docs/storage.md)."""

    MSG = 1
    ACK = 2
    KV = 7
    MOVE = 8
    CK_BEGIN = 10
    CK_USER = 11
    CK_UNREAD = 12
    CK_ENTRY = 13
    CK_IDS = 14
    CK_END = 15
    CK_KV = 16
    CK_REFS = 17
    CK_KEYS = 18


MSG, ACK, KV, MOVE = RecordType.MSG, RecordType.ACK, RecordType.KV, RecordType.MOVE
CK_BEGIN, CK_END = RecordType.CK_BEGIN, RecordType.CK_END
#: Records replayed after the checkpoint, in LSN order.
CHANGES = frozenset((MSG, ACK, KV, MOVE))
#: Record types of the removed cluster (PUT, REPLACE, UNREAD, KNOWN): skipped at recovery.
RETIRED = frozenset((3, 4, 5, 6))
#: The records between a checkpoint's begin and end.
CHECKPOINTED = frozenset((RecordType.CK_USER, RecordType.CK_UNREAD, RecordType.CK_ENTRY,
                          RecordType.CK_IDS, RecordType.CK_KV, RecordType.CK_REFS,
                          RecordType.CK_KEYS))
#: Most items one ``CK_REFS`` record holds (24 bytes each: well under a record's 1 MiB).
REFS_CHUNK = 16384

#: The packed arrays of ``CK_REFS``: sequence numbers, segment serials, offsets, sizes.
_REF_TYPES = ("q", "i", "q", "i")
assert [array(code).itemsize for code in _REF_TYPES] == [8, 4, 8, 4]
#: The packed arrays of ``CK_KEYS``: the ids' keys and their messages' ts.
_KEY_TYPES = ("q", "q")
#: Most ids one ``CK_KEYS`` record holds (16 bytes each plus the recipient).
KEYS_CHUNK = 16384


def item_size(item: Item) -> int:
    """What an item counts in the backlog's bytes: a message's body in UTF-8, a receipt's
    message ids (ASCII)."""
    if isinstance(item, Message):
        body = item.body
        return len(body) if body.isascii() else len(body.encode())
    return sum(map(len, item.ids))


def entry_fields(entry: Entry) -> list[Any]:
    """The fields that follow ``[lsn or snap, user, seq]`` in a ``CK_ENTRY`` or ``MOVE``."""
    item = entry.item
    if isinstance(item, Message):
        return ["m", item.id, item.sender, item.body, item.ts]
    return ["r", item.status, item.by, list(item.ids), item.ts]


def receipt_fields(item: ReceiptItem) -> list[Any]:
    """A receipt's fields in an ``ACK`` record, after its sender and seq."""
    return [item.status, list(item.ids), item.ts]


def _entry_item(user: str, kind: str, rest: list[Any]) -> Item:
    """The queue item of a ``CK_ENTRY`` or ``MOVE`` record of ``user``'s queue."""
    if kind == "m":
        msg_id, sender, body, ts = rest
        return Message(msg_id, sender, user, body, ts)
    status, by, ids, ts = rest
    return ReceiptItem(status, by, tuple(ids), ts)


def item_in(record_type: int, fields: list[Any], user: str, seq: int) -> Item | None:
    """The item ``seq`` of ``user``'s queue in a record, or None if the record does not
    hold it (which, for a record read where that item should be, means the wrong record).
    """
    if record_type == ACK:  # [lsn, by, status, upto, peer, [[sender, seq, ...], ...]]
        for sender, receipt_seq, status, ids, ts in fields[5]:
            if sender == user and receipt_seq == seq:
                return ReceiptItem(status, fields[1], tuple(ids), ts)
        return None
    if fields[1] != user or fields[2] != seq:
        return None
    if record_type == MSG:  # [lsn, to, seq, id, from, body, ts]
        _, to, _, msg_id, sender, body, ts = fields
        return Message(msg_id, sender, to, body, ts)
    if record_type in (RecordType.CK_ENTRY, MOVE):  # [lsn or snap, user, seq, kind, ...]
        return _entry_item(user, fields[3], fields[4:])
    return None


def adds(record_type: int, fields: list[Any]) -> list[tuple[str, int]]:
    """The queue items, as (user, seq), that a record adds: a message, an acknowledgement's
    receipts, or a checkpoint's entries or references."""
    if record_type in (MSG, RecordType.CK_ENTRY):  # [lsn or snap, user, seq, ...]
        return [(fields[1], fields[2])]
    if record_type == ACK:  # [lsn, user, status, upto, peer, [[sender, seq, ...], ...]]
        return [(receipt[0], receipt[1]) for receipt in fields[5]]
    if record_type == RecordType.CK_REFS:
        user = fields[1]
        return [(user, seq) for seq in unpack_refs(fields)[0]]
    return []


def pack_arrays(*arrays: array[int]) -> list[bytes]:
    """Arrays as the bytes a checkpoint record holds, little-endian whatever the machine."""
    packed = []
    for values in arrays:
        if sys.byteorder == "big":
            values = array(values.typecode, values)
            values.byteswap()
        packed.append(values.tobytes())
    return packed


def _unpack(codes: Sequence[str], data: Sequence[bytes]) -> list[array[int]]:
    """The arrays packed by :func:`pack_arrays`, of the given type codes.

    Raises:
        ValueError: The arrays are malformed (not of one length, or of a length that is not
            a whole number of items).
    """
    arrays = []
    for code, packed in zip(codes, data, strict=True):
        values = array(code)
        values.frombytes(packed)
        if sys.byteorder == "big":
            values.byteswap()
        arrays.append(values)
    if len({len(values) for values in arrays}) != 1:
        raise ValueError("packed arrays of different lengths")
    return arrays


def pack_refs(seqs: array[int], serials: array[int], offsets: array[int],
              sizes: array[int]) -> list[bytes]:
    """The packed arrays of a ``CK_REFS`` record."""
    return pack_arrays(seqs, serials, offsets, sizes)


def unpack_refs(fields: Sequence[Any]) -> tuple[array[int], array[int], array[int],
                                                array[int]]:
    """The arrays of a ``CK_REFS`` record [snap, user, seqs, serials, offsets, sizes].

    Raises:
        ValueError: The arrays are malformed.
    """
    seqs, serials, offsets, sizes = _unpack(_REF_TYPES, fields[2:6])
    return seqs, serials, offsets, sizes


def unpack_keys(fields: Sequence[Any]) -> tuple[array[int], array[int], list[str]]:
    """The remembered ids of a ``CK_KEYS`` record [snap, keys, tss, [to, ...]]: their keys,
    ts and recipients.

    Raises:
        ValueError: The record is malformed.
    """
    keys, tss = _unpack(_KEY_TYPES, fields[1:3])
    tos = fields[3]
    if not isinstance(tos, list) or len(tos) != len(keys):
        raise ValueError("CK_KEYS recipients do not match its keys")
    return keys, tss, tos
