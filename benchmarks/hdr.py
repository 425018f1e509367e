"""An HDR-style latency histogram: log-linear buckets, about 3 significant digits, mergeable.

Values are non-negative integers (the benchmarks record microseconds). Values below
``2 ** SUB_BITS`` (2048) have a bucket each, so they are recorded exactly; above that, every
power-of-two range is split into ``2 ** (SUB_BITS - 1)`` (1024) equal buckets, so a bucket
is at most 1/1024 of its values wide (better than 0.1 %). This is the bucket layout of
HdrHistogram with three significant digits, kept sparse in a dict so that recording is one
dict update and two histograms merge by adding counts.

A percentile is reported as the highest value its bucket holds (never above the largest
value recorded), as HdrHistogram does: an estimate never below the true sample value, and
at most one bucket width above it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

__all__ = ["SUB_BITS", "Histogram"]

#: log2 of the number of exactly recorded values; sets the precision (11 = 3 digits).
SUB_BITS = 11
_EXACT = 1 << SUB_BITS  # values below this have a bucket each
_HALF = _EXACT >> 1  # buckets per power of two above _EXACT


def bucket_index(value: int) -> int:
    """Return the index of the bucket that holds ``value`` (a non-negative integer)."""
    if value < _EXACT:
        return value
    shift = value.bit_length() - SUB_BITS
    return _EXACT + (shift - 1) * _HALF + ((value >> shift) - _HALF)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Return the lowest and highest value (inclusive) of bucket ``index``."""
    if index < _EXACT:
        return index, index
    shift, offset = divmod(index - _EXACT, _HALF)
    shift += 1
    low = (offset + _HALF) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of values in log-linear buckets, with the exact count, sum, min and max."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    def clear(self) -> None:
        """Forget every sample."""
        self.counts.clear()
        self.total = self.sum = self.min = self.max = 0

    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` samples of ``value``; negative values are recorded as 0."""
        value = max(int(value), 0)
        index = bucket_index(value)
        self.counts[index] = self.counts.get(index, 0) + count
        if not self.total or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.total += count
        self.sum += value * count

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other`` to this histogram."""
        if not other.total:
            return
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.min = other.min if not self.total else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def percentile(self, p: float) -> int:
        """Return the value at percentile ``p`` (0-100): the smallest bucket reaching it.

        The rank is ``ceil(p / 100 * total)``, as for ``sorted(samples)[rank - 1]``; the
        value returned is that sample's bucket's highest value, capped at the maximum.
        """
        if not self.total:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_bounds(index)[1], self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(low, high, count)`` for every non-empty bucket, lowest first."""
        for index in sorted(self.counts):
            low, high = bucket_bounds(index)
            yield low, high, self.counts[index]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form: the sparse bucket counts as ``[[low, high, count], ...]``."""
        return {"sub_bits": SUB_BITS, "total": self.total, "sum": self.sum, "min": self.min,
                "max": self.max, "buckets": [list(b) for b in self.buckets()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        """Rebuild a histogram written by :meth:`to_json`."""
        if data.get("sub_bits", SUB_BITS) != SUB_BITS:
            raise ValueError(f"histogram has sub_bits {data['sub_bits']}, not {SUB_BITS}")
        histogram = cls()
        for low, _high, count in data["buckets"]:
            index = bucket_index(low)
            histogram.counts[index] = histogram.counts.get(index, 0) + count
        histogram.total = data["total"]
        histogram.sum = data["sum"]
        histogram.min = data["min"]
        histogram.max = data["max"]
        return histogram
