"""Recovery of the durable store: both replicas read back, merged, and the index rebuilt.

Runs in a worker thread before the store serves (docs/storage.md, "Recovery and repair"):

1. Each replica's segments are read in order (:meth:`SegmentLog.recover`, which checks
   every record and cuts off a torn tail). Of each change record only its LSN, type and
   position are kept, in compact arrays; of checkpoints, only the newest complete one, its
   ``CK_ENTRY`` records without their bodies.
2. The newest complete checkpoint of either replica is loaded into the :class:`RefIndex`.
3. The change records above it, the union of both replicas' by LSN, are read again one by
   one at their positions, decoded and applied in LSN order: a message becomes a
   reference to its ``MSG`` record, a receipt a reference to its ``ACK``, a ``MOVE`` moves
   a reference.
4. What had to be worked around is reported, and whether the replicas must be repaired
   (rewritten identically) is decided: damage, a torn tail that left them different, a
   record or checkpoint one lacks, or segments that differ where records are still needed.
   Before the repair, the queued items one replica could not give on its own are worked
   out for the ``replica_unreadable`` alarm.

Memory stays small: about 21 bytes per change record per replica while it runs, besides
the index being built, and never a decoded body beyond the one being applied.

The module is about 600 lines: the scans of both replicas, their merge, the replay
and the reckoning of what one replica lacks read the same arrays, so they stay together.
"""

from __future__ import annotations

import bisect
import ctypes
import zlib
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import cbor2

from chatd.clock import now_ms
from chatd.logs import EventLog

from ._bodies import Bodies
from ._format import (
    ACK,
    CHANGES,
    CHECKPOINTED,
    CK_BEGIN,
    CK_END,
    KV,
    MOVE,
    MSG,
    RETIRED,
    RecordType,
    adds,
    unpack_keys,
    unpack_refs,
)
from ._ids import id_key
from ._kv import KVTable
from ._refs import RefIndex
from ._segments import Position, SegmentLog, SequentialReader

__all__ = ["Replay", "recover"]

#: A checkpoint record as recovery keeps it: type, fields (a ``CK_ENTRY``'s without its
#: item: [snap, user, seq, kind, size]), position.
_Kept = tuple[int, list[Any], Position]


@attrs.define
class _Checkpoint:
    """A complete checkpoint: the LSN it covers, its boundary (the first segment that may
    hold a change after that LSN; where it starts, in a checkpoint that does not say), and
    its records."""

    snap: int
    boundary: int
    records: list[_Kept]


class _Segment:
    """What recovery keeps of one segment's records: the LSN, type and offset of each change
    record, the LSNs of retired records, and the last complete checkpoint in it (a
    checkpoint is one batch: it never spans two segments)."""

    __slots__ = ("checkpoint", "lsns", "offsets", "retired", "serial", "types", "undecodable")

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.lsns = array("q")
        self.types = array("B")
        self.offsets = array("q")
        self.retired: list[int] = []
        self.undecodable = 0
        self.checkpoint: _Checkpoint | None = None


class _Scan:
    """What recovery keeps of one replica: its segments' change records (concatenated, in
    log order, once read), its retired records' LSNs, and its newest complete checkpoint.

    Args:
        log: The replica.
        twin: The other replica, read before: a segment of this one with the same bytes
            as the twin's (undamaged there) is taken as the twin read it, without reading
            its records again.
    """

    def __init__(self, log: SegmentLog, twin: _Scan | None = None) -> None:
        self.log = log
        self._twin = twin
        self._segments: dict[int, _Segment] = {}
        self._digests: dict[int, int] = {}
        self.lsns = array("q")
        self.types = array("B")
        self.serials = array("i")
        self.offsets = array("q")
        self.retired: set[int] = set()
        self.undecodable = 0
        self.checkpoint: _Checkpoint | None = None
        #: Segments taken from the twin without reading their records.
        self.shared = 0

    @property
    def snap(self) -> int:
        """The LSN its newest complete checkpoint covers (0 without one)."""
        return self.checkpoint.snap if self.checkpoint else 0

    def _on_segment(self, serial: int, data: bytes, last: bool) -> bool:
        """Start a segment; True if it is the twin's (its records need no reading)."""
        digest = zlib.crc32(data)
        self._digests[serial] = digest
        twin = self._twin
        # The same bytes as the twin's segment, in which it found no damage (and, for the
        # last, no torn tail: that segment here then has none either).
        if (twin is not None and twin._digests.get(serial) == digest
                and serial in twin._segments and (not last or not twin.log.truncated)
                and not any(damage.segment == serial for damage in twin.log.damage)):
            self._segments[serial] = twin._segments[serial]
            self.shared += 1
            return True
        self._segments[serial] = _Segment(serial)
        return False

    def read(self) -> None:
        """Read every record of the replica (and cut off its torn tail)."""
        current: list[_Kept] | None = None
        segment: _Segment | None = None
        begin = 0
        changes, retired = CHANGES, RETIRED
        for serial, offset, record_type, payload in self.log.recover(self._on_segment):
            if segment is None or segment.serial != serial:
                segment, current = self._segments[serial], None
            if record_type in changes:
                lsn = _lsn(payload)
                if lsn is None:
                    segment.undecodable += 1
                    continue
                segment.lsns.append(lsn)
                segment.types.append(record_type)
                segment.offsets.append(offset)
                continue
            if record_type in retired:
                lsn = _lsn(payload)
                if lsn is None:
                    segment.undecodable += 1
                else:
                    segment.retired.append(lsn)
                continue
            if record_type != CK_BEGIN and record_type != CK_END and (
                    record_type not in CHECKPOINTED or current is None):
                continue  # a checkpoint record outside a checkpoint, or a type unknown here
            fields = _decode(payload)
            if fields is None:
                segment.undecodable += 1
            elif record_type == CK_BEGIN:
                current = []
                begin = fields[1] if len(fields) > 1 and type(fields[1]) is int else serial
            elif record_type == CK_END:
                if current is not None and len(fields) == 2 and fields[1] == len(current):
                    segment.checkpoint = _Checkpoint(fields[0], begin, current)
                current = None
            elif current is not None:
                if record_type == RecordType.CK_ENTRY:
                    fields = _without_item(fields)
                current.append((record_type, fields, Position(serial, offset)))
        for serial in sorted(self._segments):
            segment = self._segments[serial]
            self.lsns += segment.lsns
            self.types += segment.types
            self.serials += array("i", [serial]) * len(segment.lsns)
            self.offsets += segment.offsets
            self.retired.update(segment.retired)
            self.undecodable += segment.undecodable
            self.checkpoint = segment.checkpoint or self.checkpoint

    def release(self) -> None:
        """Forget the per-segment results (once the other replica was read)."""
        self._segments.clear()

    def after(self, base: int) -> int:
        """Where the change records with an LSN above ``base`` start in the arrays."""
        return bisect.bisect_right(self.lsns, base)

    def readable(self, serial: int, offset: int) -> bool:
        """Whether a record at this position is whole on this replica (not damaged, not
        cut off, its segment present)."""
        size = self.log.sizes.get(serial)
        return size is not None and offset < size and not any(
            damage.segment == serial and damage.start <= offset < damage.end
            for damage in self.log.damage)


@attrs.frozen
class _Union:
    """Change records, one per LSN, in LSN order: their LSNs, the replica each is read
    from, and where it is in that replica's arrays."""

    lsns: array[int]
    replicas: array[int]
    at: array[int]

    def add(self, lsn: int, replica: int, at: int) -> None:
        self.lsns.append(lsn)
        self.replicas.append(replica)
        self.at.append(at)


@attrs.define
class Replay:
    """What recovery found, for the report and for deciding on a repair."""

    base: int = 0
    last_lsn: int = 0
    records: int = 0
    repair: list[str] = attrs.field(factory=list)
    #: Per replica that lacks queued items: the items (user, seq).
    lacking: list[tuple[SegmentLog, set[tuple[str, int]]]] = attrs.field(factory=list)
    #: Every segment on either replica.
    segments: set[int] = attrs.field(factory=set)
    #: Where the checkpoint loaded starts (0 without one).
    checkpoint_segment: int = 0


def recover(logs: Sequence[SegmentLog], index: RefIndex, kv: KVTable, bodies: Bodies,
            log: EventLog) -> Replay:
    """Read both replicas, rebuild ``index`` and ``kv`` from them, and report.

    Blocking: run in a worker thread, before the store serves.

    Returns:
        What was found; :attr:`Replay.repair` says why the replicas must be rewritten
        (empty: they need not be).
    """
    replay = _Recovery(logs, index, kv, bodies, log).run()
    _give_back_freed_memory()
    return replay


def _give_back_freed_memory() -> None:
    """Hand the heap memory recovery used and freed back to the system, where the C
    library can (glibc's ``malloc_trim``).

    Recovery's arrays of every record grow to tens of megabytes and are freed at its end;
    glibc keeps such memory for reuse, so a store recovered from 1,000,000 queued messages
    held 80 bytes of RSS per message instead of 31.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


class _Recovery:
    def __init__(self, logs: Sequence[SegmentLog], index: RefIndex, kv: KVTable,
                 bodies: Bodies, log: EventLog) -> None:
        first = _Scan(logs[0])
        self.scans = [first, _Scan(logs[1], twin=first)]
        self.index = index
        self.kv = kv
        self.bodies = bodies
        self._log = log
        self.readers = [SequentialReader(segment_log.directory) for segment_log in logs]
        self.now = now_ms()

    def run(self) -> Replay:
        try:
            return self._run()
        finally:
            for reader in self.readers:
                reader.close()

    def _run(self) -> Replay:
        replay = Replay()
        for scan in self.scans:
            scan.read()
            self._report_damage(scan, replay)
        self.scans[0].release()
        best = max((scan.checkpoint for scan in self.scans), key=lambda c: c.snap if c else -1)
        if best is not None:
            replay.base, replay.checkpoint_segment = best.snap, best.boundary
            self._load_checkpoint(best.records, replay)
        union, missing = self._merge(replay)
        retired = {lsn for scan in self.scans for lsn in scan.retired if lsn > replay.base}
        if retired:
            self._log.warning("retired_records_skipped", count=len(retired))
        replay.last_lsn = max([replay.base, *retired, union.lsns[-1] if union.lsns else 0])
        lost = replay.last_lsn - replay.base - len(union.lsns) - len(retired)
        if lost:
            self._log.error("records_lost", error="records_lost", count=lost)
        self._replay(union, replay)
        replay.records = len(union.lsns)
        self.index.forget_ids(self.now)
        for replica, (scan, lsns) in enumerate(zip(self.scans, missing, strict=True)):
            own_retired = {lsn for lsn in scan.retired if lsn > replay.base}
            differs = bool(lsns) or own_retired != retired or scan.snap != replay.base
            if differs:
                replay.repair.append(f"{scan.log.directory} differs from its peer")
            if differs or scan.log.damage or scan.log.truncated:
                items = self._lacking(replica, lsns, best, replay.base)
                replay.lacking.append((scan.log, items))
        replay.segments = {serial for scan in self.scans for serial in scan.log.sizes}
        sizes = [scan.log.sizes for scan in self.scans]
        if any(sizes[0].get(serial) != sizes[1].get(serial) for serial in replay.segments
               if serial >= replay.checkpoint_segment or serial in self.index.usage):
            replay.repair.append("the replicas' segments differ")
        return replay

    def _report_damage(self, scan: _Scan, replay: Replay) -> None:
        directory = scan.log.directory
        if scan.undecodable:
            replay.repair.append(f"undecodable record in {directory}")
        for damage in scan.log.damage:
            self._log.error("replica_damaged", error="replica_damaged", replica=str(directory),
                           segment=damage.segment, start=damage.start, end=damage.end,
                           reason=damage.reason)
            replay.repair.append(f"damage in {directory}")
        if scan.log.truncated:
            self._log.warning("torn_tail_truncated", replica=str(directory),
                             bytes=scan.log.truncated)
            replay.repair.append(f"torn tail in {directory}")

    # -- the union of both replicas' changes -------------------------------------------

    def _merge(self, replay: Replay) -> tuple[_Union, list[list[int]]]:
        """The change records above the checkpoint, one per LSN, in LSN order; and for
        each replica, where the changes it lacks are in the *other* replica's arrays."""
        first, second = self.scans
        a, b = first.after(replay.base), second.after(replay.base)
        end_a, end_b = len(first.lsns), len(second.lsns)
        if first.lsns[a:] == second.lsns[b:]:  # as it should be: one pass in C
            if (first.serials[a:], first.offsets[a:]) != (second.serials[b:],
                                                          second.offsets[b:]):
                replay.repair.append("the replicas' records are at different positions")
            return _Union(first.lsns[a:], array("B", bytes(end_a - a)),
                          array("q", range(a, end_a))), [[], []]
        union = _Union(array("q"), array("B"), array("q"))
        missing: list[list[int]] = [[], []]
        moved = False
        while a < end_a or b < end_b:
            lsn_a = first.lsns[a] if a < end_a else -1
            lsn_b = second.lsns[b] if b < end_b else -1
            if lsn_b < 0 or 0 <= lsn_a < lsn_b:
                union.add(lsn_a, 0, a)
                missing[1].append(a)
                a += 1
            elif lsn_a < 0 or lsn_b < lsn_a:
                union.add(lsn_b, 1, b)
                missing[0].append(b)
                b += 1
            else:
                union.add(lsn_a, 0, a)
                moved |= (first.serials[a], first.offsets[a]) != (second.serials[b],
                                                                  second.offsets[b])
                a += 1
                b += 1
        if moved:
            replay.repair.append("the replicas' records are at different positions")
        return union, missing

    def _replay(self, union: _Union, replay: Replay) -> None:
        """Apply the change records of ``union`` in LSN order, each read back from the
        replica it is taken from (whose scan checked its CRC) and decoded.

        A message's id is remembered only if it is among the last ``dedup_max`` messages
        replayed: the earlier ones would be forgotten again before recovery ends.
        """
        scans, readers, index = self.scans, self.readers, self.index
        forget = self._messages(union) - index.dedup_max
        window_ms, now = index.dedup_window_ms, self.now
        for lsn, replica, at in zip(union.lsns, union.replicas, union.at, strict=True):
            scan = scans[replica]
            serial, offset = scan.serials[at], scan.offsets[at]
            try:
                fields = _decode(readers[replica].verified(serial, offset))
            except Exception:  # changed since it was read; counted as undecodable
                fields = None
            if fields is None or fields[0] != lsn:
                replay.repair.append(f"undecodable record in {scan.log.directory}")
                continue
            record_type = scan.types[at]
            if record_type == MSG:  # most records: applied here, without a call
                _, to, seq, msg_id, sender, body, ts = fields
                if forget > 0:
                    forget -= 1
                elif ts + window_ms > now:
                    index.remember(id_key(sender, msg_id), to, ts)
                index.add(to, seq, (serial, offset),
                          len(body) if body.isascii() else len(body.encode()), False)
            else:
                self._apply(record_type, fields, Position(serial, offset))

    def _fields(self, replica: int, position: Position) -> list[Any] | None:
        """The decoded fields of the record at ``position`` on ``replica``, or None."""
        try:
            _, payload = self.readers[replica].read(position)
        except Exception:  # changed since it was read; counted as undecodable
            return None
        return _decode(payload)

    def _messages(self, union: _Union) -> int:
        """How many of ``union``'s records are messages."""
        first, at = self.scans[0], union.at
        if at and not union.replicas.count(1) and at[-1] - at[0] == len(at) - 1:
            return first.types[at[0]:at[-1] + 1].count(MSG)  # one replica's run, in C
        return sum(self.scans[replica].types[place] == MSG
                   for replica, place in zip(union.replicas, at, strict=True))

    # -- rebuilding the state -------------------------------------------------------------

    def _load_checkpoint(self, records: list[_Kept], replay: Replay) -> None:
        index, kv, now = self.index, self.kv, self.now
        for record_type, fields, position in records:
            match record_type:
                case RecordType.CK_USER:
                    _, user, last_seq, *acked = fields
                    index.restore_user(user, last_seq, (), acked[0] if acked else 0)
                case RecordType.CK_UNREAD:
                    _, user, unread = fields
                    index.restore_user(user, 0, [tuple(u) for u in unread])
                case RecordType.CK_ENTRY:
                    _, user, seq, kind, size = fields
                    index.add(user, seq, position, size, kind == "r")
                case RecordType.CK_REFS:
                    try:
                        arrays = unpack_refs(fields)
                    except ValueError:
                        replay.repair.append("undecodable checkpoint record")
                        continue
                    index.restore(fields[1], arrays)
                case RecordType.CK_KEYS:
                    try:
                        keys, tss, tos = unpack_keys(fields)
                    except ValueError:
                        replay.repair.append("undecodable checkpoint record")
                        continue
                    index.ids.extend(keys, tss, tos)
                case RecordType.CK_IDS:  # written before CK_KEYS
                    for sender, msg_id, to, ts in fields[1]:
                        if ts + index.dedup_window_ms > now:
                            index.remember(id_key(sender, msg_id), to, ts)
                case RecordType.CK_KV:
                    _, bucket, revision, kept = fields
                    kv.restore_revision(bucket, revision)
                    for key, value, key_revision, expires in kept:
                        if not expires or expires > now:
                            kv.apply(bucket, key, value, key_revision, expires)

    def _apply(self, record_type: int, fields: list[Any], position: Position) -> None:
        """Apply a change record other than a message."""
        index = self.index
        if record_type == ACK:
            # The messages it removes are read back (sender and id, for the unread memory).
            _, user, status, upto, peer, receipts = fields
            index.apply_ack(user, status, upto, peer, None, self.bodies.messages_now)
            for sender, seq, _, ids, _ in receipts:
                index.add(sender, seq, position, sum(map(len, ids)), True)
        elif record_type == MOVE:
            user, seq = fields[1], fields[2]
            ref = index.ref(user, seq)
            if ref is not None:
                index.move(user, seq, Position(ref[1], ref[2]), position)
        elif record_type == KV:
            _, bucket, key, value, revision, expires = fields
            if expires and expires <= self.now:
                value = None
            self.kv.apply(bucket, key, value, revision, expires)

    # -- what one replica could not give on its own -----------------------------------

    def _lacking(self, replica: int, missing: list[int], best: _Checkpoint | None,
                 base: int) -> set[tuple[str, int]]:
        """The queued items that one replica could not give on its own.

        Those are the items added by a change the replica lacks; when it lacks the newest
        checkpoint, the items of that checkpoint which its own older checkpoint and
        changes do not add either; and the items whose record (a checkpoint's reference
        to an older record included) is damaged or gone on this replica. Runs once the
        merged state is in the index.

        Args:
            replica: The replica.
            missing: Where the changes it lacks are in the *other* replica's arrays.
            best: The newest complete checkpoint of either replica, which was loaded.
            base: The LSN ``best`` covers (0 without one).

        Returns:
            The items as (user, seq), among those still queued.
        """
        scan, other = self.scans[replica], self.scans[1 - replica]
        added = [key for at in missing for key in self._adds_at(1 - replica, other, at)]
        # Items it may hold elsewhere than where the index says: those of a checkpoint it
        # lacks, and those whose record is not whole on it.
        suspect = []
        if scan.snap != base:
            assert best is not None  # base is the newest checkpoint's LSN, above 0
            suspect = [key for record_type, fields, _ in best.records
                       for key in adds(record_type, fields)]
        suspect += [(user, seq) for user, seq, serial, offset in self._queued()
                    if not scan.readable(serial, offset)]
        if suspect:
            own = self._own(replica)
            added += [key for key in suspect if key not in own]
        return {key for key in added if self.index.holds(*key)}

    def _own(self, replica: int) -> set[tuple[str, int]]:
        """The items this replica's own records give whole: its checkpoint's entries, and
        the references whose records it can read; and the items its changes since its
        checkpoint add or copy (``MOVE``)."""
        scan = self.scans[replica]
        own: set[tuple[str, int]] = set()
        for record_type, fields, _ in scan.checkpoint.records if scan.checkpoint else ():
            if record_type == RecordType.CK_REFS:
                try:
                    seqs, serials, offsets, _ = unpack_refs(fields)
                except ValueError:
                    continue
                own.update((fields[1], seq) for seq, serial, offset in zip(
                    seqs, serials, offsets, strict=True) if scan.readable(serial, offset))
            else:
                own.update(adds(record_type, fields))
        for at in range(scan.after(scan.snap), len(scan.lsns)):
            own.update(self._adds_at(replica, scan, at, moves=True))
        return own

    def _adds_at(self, replica: int, scan: _Scan, at: int, *, moves: bool = False
                 ) -> list[tuple[str, int]]:
        """The items the change record at ``at`` in ``scan``'s arrays adds (and, with
        ``moves``, the item a ``MOVE`` copies)."""
        record_type = scan.types[at]
        if record_type not in (MSG, ACK, MOVE) or (record_type == MOVE and not moves):
            return []
        fields = self._fields(replica, Position(scan.serials[at], scan.offsets[at]))
        if fields is None:
            return []
        if record_type == MOVE:
            return [(fields[1], fields[2])]
        return adds(record_type, fields)

    def _queued(self) -> Iterator[tuple[str, int, int, int]]:
        """Every queued item: (user, seq, serial, offset)."""
        for user, _, _, _, (seqs, serials, offsets, _) in self.index.queues():
            yield from ((user, seq, serial, offset)
                        for seq, serial, offset in zip(seqs, serials, offsets, strict=True))


def _decode(payload: bytes) -> list[Any] | None:
    """A record's fields, or None if it is not a CBOR array starting with an integer."""
    try:
        fields = cbor2.loads(payload)
    except Exception:
        return None
    if not isinstance(fields, list) or not fields or type(fields[0]) is not int:
        return None
    return fields


def _lsn(payload: bytes) -> int | None:
    """The first field of a record (its LSN) without decoding the rest, or None if the
    record is not a CBOR array starting with an unsigned integer."""
    if len(payload) < 2:
        return None
    head, at = payload[0], 1
    if 0x98 <= head <= 0x9B:  # an array whose length follows in 1, 2, 4 or 8 bytes
        at += 1 << (head - 0x98)
    elif not 0x81 <= head <= 0x97:  # not an array of 1 to 23 fields
        fields = _decode(payload)
        return fields[0] if fields is not None else None
    if at >= len(payload):
        return None
    info = payload[at]
    if info <= 0x17:
        return info
    if 0x18 <= info <= 0x1B:
        width = 1 << (info - 0x18)
        value = payload[at + 1:at + 1 + width]
        return int.from_bytes(value, "big") if len(value) == width else None
    return None


def _without_item(fields: list[Any]) -> list[Any]:
    """A ``CK_ENTRY`` [snap, user, seq, kind, ...item] as [snap, user, seq, kind, size]."""
    snap, user, seq, kind, *rest = fields
    if kind == "m":  # id, from, body, ts
        body = rest[2]
        size = len(body) if body.isascii() else len(body.encode())
    else:  # status, by, ids, ts
        size = sum(map(len, rest[2]))
    return [snap, user, seq, kind, size]
