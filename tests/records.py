"""Segment-log records as tests read them back: a named view of what recovery yields."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from chatd.backends.embedded._segments import Position, SegmentLog

__all__ = ["Record", "read_records"]


class Record(NamedTuple):
    """One valid record read back from the log."""

    position: Position
    type: int
    payload: bytes


def read_records(log: SegmentLog) -> Iterator[Record]:
    """Recover ``log`` (see :meth:`SegmentLog.recover`), each record as a :class:`Record`."""
    for serial, offset, record_type, payload in log.recover():
        yield Record(Position(serial, offset), record_type, payload)
