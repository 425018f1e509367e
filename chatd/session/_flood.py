"""The flood budget of one connection: a token bucket counted in frames.

Sans-IO: the caller passes the time, so the bucket is tested on plain numbers and the
session decides what waiting means (docs/protocol.md 5.1).
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """A budget that holds at most ``burst`` frames and refills at ``rate`` per second.

    Spending more than the budget holds is allowed: the budget goes negative, and
    :meth:`spend` says how long to wait until it is back at zero. The caller waits that
    long before reading more, so a flood slows only its own sender and nothing is dropped.

    Args:
        rate: Frames per second the budget refills by.
        burst: The most frames the budget holds (and holds at the start).
        now: The current time, in seconds.
    """

    __slots__ = ("_at", "_budget", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._budget = float(burst)
        self._at = now

    def _refill(self, now: float) -> float:
        return min(float(self.burst), self._budget + max(0.0, now - self._at) * self.rate)

    def would_wait(self, frames: int, now: float) -> bool:
        """Whether spending ``frames`` at ``now`` would leave the budget below zero."""
        return self._refill(now) < frames

    def spend(self, frames: int, now: float) -> float:
        """Take ``frames`` from the budget at ``now``.

        Returns:
            Seconds until the budget is back at zero: 0.0 if it covered them.
        """
        self._budget = self._refill(now) - frames
        self._at = now
        return 0.0 if self._budget >= 0 else -self._budget / self.rate
