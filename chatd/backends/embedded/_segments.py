"""Append-only segment files: the on-disk log of one store replica.

A replica is a directory of segment files named by a 20-digit, zero-padded serial number
(``00000000000000000001.seg``), appended in serial order. Each file starts with the 8-byte
magic ``CHATDSG1`` and then holds records back to back::

    offset  size  field
    0       4     length    payload size in bytes, big-endian unsigned
    4       1     type      record type, 1-255 (0 is never written)
    5       4     crc       CRC-32 (zlib) of the length and type bytes and the payload
    9       n     payload   opaque to this module (the store writes CBOR)

Writing and syncing are separate steps so that a caller can group commit: write the records
of many requests, then make them durable with one :meth:`SegmentLog.sync`. A segment rolls
(a new file is started) before a batch that would begin at or past ``segment_bytes``; a
batch never spans two files. Creating, truncating and deleting files are followed by an
fsync of the directory.

Recovery (:meth:`SegmentLog.recover`) reads every segment in order and yields the valid
records. Where a record is damaged it looks for the next valid record; damage followed by a
valid record is reported in :attr:`SegmentLog.damage` and never silently skipped. Damage
that runs to the end of the *last* segment is a torn tail, the trace of a write the process
did not finish: it is cut off (the file is truncated) and reported in
:attr:`SegmentLog.truncated`. After recovery the log appends after the last valid record.

A record can also be read back where it was written (:class:`SegmentReader`, from any
thread): the durable store keeps only that position of a queued item in memory.

Any OS error while writing, syncing, rolling or deleting makes the log *failed*: every
later call raises :class:`ReplicaFailed`. Nothing is retried, because after a failed fsync
the kernel may have dropped the dirty pages, and a later successful fsync would prove
nothing about them.

The methods do blocking file I/O; the persistence actor runs them in a worker thread.

The module is a little over 500 lines: the record format (header, CRC, magic, segment names)
is stated once, here, and the log that writes and recovers records and the readers that
read one back at its position both parse it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import attrs

__all__ = ["HEADER_BYTES", "MAGIC", "Block", "Damage", "Position",
           "RecordUnreadable", "ReplicaFailed", "SegmentLog", "SegmentReader",
           "SequentialReader", "encode_block", "encode_record"]

MAGIC = b"CHATDSG1"
_HEADER = struct.Struct(">IB")
_CRC = struct.Struct(">I")
_HEADER_CRC = struct.Struct(">IBI")
HEADER_BYTES = _HEADER.size + _CRC.size
_SUFFIX = ".seg"


class ReplicaFailed(Exception):
    """The replica hit an I/O error; it accepts nothing more until it is reopened."""


class RecordUnreadable(Exception):
    """No valid record could be read at a position (I/O error, missing file, bad CRC)."""


class Position(NamedTuple):
    """Where a record starts: segment serial and byte offset in that file."""

    segment: int
    offset: int


@attrs.frozen(slots=True)
class Damage:
    """A byte range that holds no valid record, before the end of the log."""

    segment: int
    start: int
    end: int
    reason: str


def encode_record(record_type: int, payload: bytes) -> bytes:
    """The bytes of one record."""
    if not 0 < record_type < 256:
        raise ValueError(f"record type must be 1-255, not {record_type}")
    head = _HEADER.pack(len(payload), record_type)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + _CRC.pack(crc) + payload


class Block(NamedTuple):
    """Records encoded back to back, ready to be written as they are to every replica."""

    data: bytes
    #: Where each record starts, from the start of ``data``.
    offsets: list[int]

    def positions(self, start: Position) -> list[Position]:
        """Where the records are once the block was written at ``start``."""
        segment, base = start
        return [Position(segment, base + offset) for offset in self.offsets]


def encode_block(records: Sequence[tuple[int, bytes]], max_record: int) -> Block:
    """Encode (type, payload) records once, for every replica to write the same bytes.

    Raises:
        ValueError: A type is outside 1-255, or a payload is larger than ``max_record``.
    """
    chunks = []
    offsets = []
    offset = 0
    for record_type, payload in records:
        if len(payload) > max_record:
            raise ValueError(f"record of {len(payload)} bytes exceeds {max_record}")
        chunk = encode_record(record_type, payload)
        chunks.append(chunk)
        offsets.append(offset)
        offset += len(chunk)
    return Block(b"".join(chunks), offsets)


def _segment_name(serial: int) -> str:
    return f"{serial:020d}{_SUFFIX}"


class SegmentLog:
    """The segment files of one replica directory.

    Args:
        directory: The replica's directory; created if missing.
        segment_bytes: Size at which a new segment is started.
        max_record: Largest payload accepted or believed when reading back.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 64 * 1024 * 1024,
                 max_record: int = 1024 * 1024) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_record = max_record
        self.damage: list[Damage] = []
        self.truncated = 0
        #: Each segment's size once recovered (after a torn tail was cut off).
        self.sizes: dict[int, int] = {}
        self.failed: OSError | None = None
        self._fd: int | None = None
        self._serial = 0
        self._size = 0
        self._dirty_dir = False
        self._recovered = False

    # -- reading back -----------------------------------------------------------------

    def segments(self) -> list[int]:
        """Serial numbers of the segment files present, in order."""
        serials = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            stem = path.name[:-len(_SUFFIX)]
            if len(stem) == 20 and stem.isdigit():
                serials.append(int(stem))
        return sorted(serials)

    def recover(self, on_segment: Callable[[int, bytes, bool], bool] | None = None
                ) -> Iterator[tuple[int, int, int, bytes]]:
        """Yield every valid record in order, as (serial, offset, type, payload), then
        leave the log ready to append (plain tuples: recovery reads millions, and a
        NamedTuple per record cost more than reading it).

        Damage before the end is recorded in :attr:`damage`; a torn tail is truncated and
        its size added to :attr:`truncated`. Must be exhausted before :meth:`append`.

        Args:
            on_segment: Called with each segment's serial, its bytes, and whether it is
                the last, before its records are read; if it returns True, the segment is
                known to hold only valid records (another replica has the same bytes and
                they were read there) and its records are neither checked nor yielded.

        Raises:
            ReplicaFailed: The directory or a segment cannot be read or repaired.
        """
        self._guard()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            serials = self.segments()
            for index, serial in enumerate(serials):
                last = index == len(serials) - 1
                data = (self.directory / _segment_name(serial)).read_bytes()
                if on_segment is not None and on_segment(serial, data, last):
                    end: int | None = len(data)
                else:
                    end = yield from self._scan(serial, data, last)
                self.sizes[serial] = len(data)
                if not last:
                    continue
                if end is None:
                    self._serial = serial  # unreadable start: the next append rolls
                else:
                    self._open_existing(serial, end, len(data))
                    self.sizes[serial] = self._size
        except OSError as exc:
            raise self._fail(exc) from exc
        self._recovered = True

    def _scan(self, serial: int, data: bytes, last: bool
              ) -> Generator[tuple[int, int, int, bytes], None, int | None]:
        """Yield the valid records of one segment.

        Returns:
            Where appending may resume in this segment, or None if it must not be appended
            to (its magic is damaged).
        """
        if data[:len(MAGIC)] != MAGIC:
            if last and MAGIC.startswith(data[:len(MAGIC)]):
                return 0  # the file was created but its magic never fully written
            self.damage.append(Damage(serial, 0, len(data), "bad_magic"))
            return None
        pos, size = len(MAGIC), len(data)
        unpack, crc32, max_record = _HEADER_CRC.unpack_from, zlib.crc32, self.max_record
        while pos < size:
            if size - pos >= HEADER_BYTES:  # _valid, written out: every record's path
                length, record_type, crc = unpack(data, pos)
                end = pos + HEADER_BYTES + length
                if record_type and length <= max_record and end <= size:
                    payload = data[pos + HEADER_BYTES:end]
                    if crc32(payload, crc32(data[pos:pos + _HEADER.size])) == crc:
                        yield serial, pos, record_type, payload
                        pos = end
                        continue
            resume = self._next_valid(data, pos + 1)
            if resume is None:
                if last:
                    return pos  # torn tail: everything from pos is cut off
                self.damage.append(Damage(serial, pos, len(data), "bad_record"))
                return len(data)
            self.damage.append(Damage(serial, pos, resume, "bad_record"))
            pos = resume
        return pos

    def _valid(self, data: bytes, pos: int) -> bool:
        """Whether a whole record with a good CRC starts at ``pos``."""
        if len(data) - pos < HEADER_BYTES:
            return False
        length, record_type, crc = _HEADER_CRC.unpack_from(data, pos)
        end = pos + HEADER_BYTES + length
        if record_type == 0 or length > self.max_record or end > len(data):
            return False
        payload = data[pos + HEADER_BYTES:end]
        return bool(zlib.crc32(payload, zlib.crc32(data[pos:pos + _HEADER.size])) == crc)

    def _next_valid(self, data: bytes, start: int) -> int | None:
        for pos in range(start, len(data) - HEADER_BYTES + 1):
            if self._valid(data, pos):
                return pos
        return None

    # -- writing ----------------------------------------------------------------------

    def append(self, records: Sequence[tuple[int, bytes]]) -> list[Position]:
        """Write records (type, payload) to the current segment; not durable until synced.

        Rolls to a new segment first if the current one has reached ``segment_bytes``.

        Raises:
            ReplicaFailed: The log has failed, or the write failed (it now has).
            ValueError: A type is outside 1-255, or a payload is larger than
                ``max_record``.
        """
        block = encode_block(records, self.max_record)
        return block.positions(self.append_block(block))

    def append_block(self, block: Block) -> Position:
        """Write an encoded block (:func:`encode_block`) to the current segment, rolling
        first as :meth:`append` does; not durable until synced.

        The journal encodes a batch once and has every replica write the same bytes, so
        its worker threads spend their time in system calls rather than holding the GIL.

        Returns:
            Where the block starts.

        Raises:
            ReplicaFailed: The log has failed, or the write failed (it now has).
        """
        self._guard()
        if not self._recovered:
            raise RuntimeError("recover() must be exhausted before appending")
        try:
            if self._fd is None or self._size >= self.segment_bytes:
                self._roll()
            assert self._fd is not None
            start = Position(self._serial, self._size)
            _write_all(self._fd, block.data)
            self._size += len(block.data)
        except OSError as exc:
            raise self._fail(exc) from exc
        return start

    def sync(self) -> None:
        """Make everything appended so far durable (fsync the file, and the directory if
        files were created or removed since the last sync).

        Raises:
            ReplicaFailed: The log has failed, or this fsync failed (it now has).
        """
        self._guard()
        try:
            if self._fd is not None:
                os.fsync(self._fd)
            if self._dirty_dir:
                _fsync_dir(self.directory)
                self._dirty_dir = False
        except OSError as exc:
            raise self._fail(exc) from exc

    def start_segment(self, serial: int | None = None) -> None:
        """Finish the current segment (fsync'd) and append from now on to a new one.

        Args:
            serial: The new segment's serial (by default, the next one); above every
                segment's. Giving two replicas the same one keeps their positions equal.

        Raises:
            ReplicaFailed: The log has failed, or the roll failed (it now has).
            ValueError: ``serial`` is not above the current segment's.
        """
        self._guard()
        if serial is not None and serial <= self._serial:
            raise ValueError(f"segment {serial} is not after segment {self._serial}")
        try:
            self._roll(serial)
        except OSError as exc:
            raise self._fail(exc) from exc

    @property
    def current_segment(self) -> int:
        """The serial of the segment being appended to (0 before the first append)."""
        return self._serial

    def delete(self, serial: int) -> None:
        """Remove a segment whose records are no longer needed, durably.

        Raises:
            ValueError: ``serial`` is the segment being appended to.
            ReplicaFailed: The log has failed, or the removal failed (it now has).
        """
        self._guard()
        if serial == self._serial:
            raise ValueError("the current segment cannot be deleted")
        try:
            (self.directory / _segment_name(serial)).unlink(missing_ok=True)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        """Close the current file (nothing is synced)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- internals ----------------------------------------------------------------------

    def _open_existing(self, serial: int, end: int, size: int) -> None:
        fd = os.open(self.directory / _segment_name(serial), os.O_WRONLY)
        if end < size:
            os.ftruncate(fd, end)
            os.fsync(fd)
            _fsync_dir(self.directory)
            self.truncated += size - end
        if end == 0:
            _write_all(fd, MAGIC)
            os.fsync(fd)
            end = len(MAGIC)
        os.lseek(fd, end, os.SEEK_SET)
        self._fd, self._serial, self._size = fd, serial, end

    def _roll(self, serial: int | None = None) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        serial = serial if serial is not None else self._serial + 1
        fd = os.open(self.directory / _segment_name(serial),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd, self._serial = fd, serial
        _write_all(fd, MAGIC)
        self._size = len(MAGIC)
        self._dirty_dir = True

    def _guard(self) -> None:
        if self.failed is not None:
            raise ReplicaFailed(f"replica {self.directory} failed: {self.failed}")

    def _fail(self, exc: OSError) -> ReplicaFailed:
        self.failed = exc
        self.close()
        return ReplicaFailed(f"replica {self.directory} failed: {exc}")


class SegmentReader:
    """Reads records back at their positions in one replica directory.

    Safe in a worker thread while the log appends in another: it opens the segment files
    for reading on its own (each once, until :meth:`close`).

    Args:
        directory: The replica's directory.
        max_record: Largest payload believed.
    """

    #: Bytes read at once: the header and a small record's payload in one call.
    _FIRST_READ = 4096

    def __init__(self, directory: Path, *, max_record: int = 1024 * 1024) -> None:
        self.directory = directory
        self.max_record = max_record
        self._fds: dict[int, int] = {}

    def read(self, position: Position) -> tuple[int, bytes]:
        """The record (type, payload) that starts at ``position``.

        Raises:
            RecordUnreadable: The file is missing or unreadable, or no valid record starts
                there.
        """
        try:
            fd = self._fds.get(position.segment)
            if fd is None:
                fd = os.open(self.directory / _segment_name(position.segment), os.O_RDONLY)
                self._fds[position.segment] = fd
            data = self._pread(fd, position.segment, self._FIRST_READ, position.offset)
            if len(data) < HEADER_BYTES:
                raise RecordUnreadable(f"no record at {position}: the file ends")
            length, record_type = _HEADER.unpack_from(data)
            if record_type == 0 or length > self.max_record:
                raise RecordUnreadable(f"no record at {position}: bad header")
            end = HEADER_BYTES + length
            if len(data) < end:
                data += self._pread(fd, position.segment, end - len(data),
                                    position.offset + len(data))
        except OSError as exc:
            raise RecordUnreadable(f"{self.directory}: {exc}") from exc
        if len(data) < end:
            raise RecordUnreadable(f"no record at {position}: the file ends")
        (crc,) = _CRC.unpack_from(data, _HEADER.size)
        payload = data[HEADER_BYTES:end]
        if zlib.crc32(payload, zlib.crc32(data[:_HEADER.size])) != crc:
            raise RecordUnreadable(f"no record at {position}: bad CRC")
        return record_type, payload

    def _pread(self, fd: int, serial: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes of segment ``serial`` (open as ``fd``) at ``offset``."""
        return os.pread(fd, size, offset)

    def close(self) -> None:
        """Close every file opened."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class SequentialReader(SegmentReader):
    """A :class:`SegmentReader` for one thread reading mostly forward, as recovery replays
    a log: it reads :data:`WINDOW` bytes at a time and serves the records inside them from
    memory (one ``pread`` per window instead of one per record).

    Only for files nobody appends to meanwhile: a window is not read again.
    """

    #: Bytes read at once.
    WINDOW = 1024 * 1024

    def __init__(self, directory: Path, *, max_record: int = 1024 * 1024) -> None:
        super().__init__(directory, max_record=max_record)
        self._window: tuple[int, int, bytes] = (-1, 0, b"")

    def verified(self, serial: int, offset: int) -> bytes:
        """The payload of the record at (``serial``, ``offset``), which
        :meth:`SegmentLog.recover` already checked in these very bytes: served from the
        window without checking its CRC again (recovery replays every change this way).

        Raises:
            RecordUnreadable: As :meth:`read`, when the record is not in the window and is
                read anew (and checked).
        """
        held, start, data = self._window
        at = offset - start
        if held == serial and at >= 0 and at + HEADER_BYTES <= len(data):
            end = at + HEADER_BYTES + int.from_bytes(data[at:at + 4])
            if end <= len(data):
                return data[at + HEADER_BYTES:end]
        return self.read(Position(serial, offset))[1]

    def _pread(self, fd: int, serial: int, size: int, offset: int) -> bytes:
        held, start, data = self._window
        at = offset - start
        if held != serial or at < 0 or at + size > len(data):
            data = os.pread(fd, max(size, self.WINDOW), offset)
            self._window, at = (serial, offset, data), 0
        return data[at:at + size]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
