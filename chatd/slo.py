"""Service-level objectives for sending, and multi-window burn-rate alarms on them.

Two objectives, both configurable: a share of sends answered ``sent`` within a latency
(default 99.99% within 5 ms), and a share of sends answered without a server error
(default 99.999%). An objective's *error budget* is the share it may miss (0.01%); its *burn
rate* over a window is the share it missed there divided by the budget, so a burn rate of 1
spends the budget exactly over the objective's period.

Alarms follow the multi-window, multi-burn-rate scheme of Google's SRE workbook: an alarm
is raised while the burn rate over a long window *and* over a short one both exceed its
factor (the long window makes it significant, the short one makes it clear quickly once
the cause is gone), and cleared as soon as either falls below:

========  ===========  ============  ======
severity  long window  short window  factor
========  ===========  ============  ======
page      1 h          5 min         14.4
ticket    6 h          30 min        6
========  ===========  ============  ======

:class:`BurnRate` is sans-IO (cumulative counts in, burn rates and alarm changes out) and is
tested on plain numbers; :class:`SloMonitor` is the node's actor that samples the metrics
every ``slo_interval`` seconds, logs ``slo_burn`` / ``slo_burn_cleared`` and exports the
state to ``/metrics``.
"""

from __future__ import annotations

import collections
import logging

import attrs
import trio

from chatd.config import Config
from chatd.logs import EventLog
from chatd.metrics import Metrics

__all__ = ["RECENT", "WINDOWS", "Alarm", "BurnRate", "SloMonitor", "Window"]

logger = logging.getLogger(__name__)


@attrs.frozen
class Window:
    """One alarm: its severity, its two windows (seconds) and its burn-rate factor."""

    severity: str
    long: float
    short: float
    factor: float


#: Seconds of the "recent" figures the monitor exports for ``chatd status``.
RECENT = 60.0

#: The alarms every objective has.
WINDOWS = (Window("page", 3600.0, 300.0, 14.4), Window("ticket", 21600.0, 1800.0, 6.0))


@attrs.frozen
class Alarm:
    """An alarm raised or cleared, with the burn rates that decided it."""

    objective: str
    severity: str
    raised: bool
    long_burn: float
    short_burn: float


class BurnRate:
    """The burn rates of one objective, from cumulative counts of good and all events.

    Args:
        objective: Its name (``send_latency``, ``send_availability``).
        target: The share of events that must be good, below 1 (0.9999).
        windows: Its alarms.
    """

    def __init__(self, objective: str, target: float,
                 windows: tuple[Window, ...] = WINDOWS) -> None:
        if not 0 < target < 1:
            raise ValueError(f"an objective's target is between 0 and 1, not {target}")
        self.objective = objective
        self.budget = 1.0 - target
        self.windows = windows
        self._horizon = max(w.long for w in windows)
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        #: The severities whose alarm is raised.
        self.raised: set[str] = set()

    def burn(self, window: float) -> float:
        """The burn rate over the last ``window`` seconds of samples (0 without events)."""
        if not self._samples:
            return 0.0
        now, good, total = self._samples[-1]
        start = self._samples[0]
        for sample in self._samples:  # the oldest sample within the window
            if sample[0] >= now - window:
                start = sample
                break
        events = total - start[2]
        if events <= 0:
            return 0.0
        return (events - (good - start[1])) / events / self.budget

    def sample(self, now: float, good: int, total: int) -> list[Alarm]:
        """Add the cumulative counts at ``now``; the alarms raised or cleared by them."""
        self._samples.append((now, good, total))
        while self._samples and self._samples[0][0] < now - self._horizon:
            self._samples.popleft()
        changes = []
        for window in self.windows:
            long_burn, short_burn = self.burn(window.long), self.burn(window.short)
            firing = long_burn > window.factor and short_burn > window.factor
            if firing != (window.severity in self.raised):
                if firing:
                    self.raised.add(window.severity)
                else:
                    self.raised.discard(window.severity)
                changes.append(Alarm(self.objective, window.severity, firing, long_burn,
                                     short_burn))
        return changes


class SloMonitor:
    """The node's SLO actor: samples the send metrics and raises and clears alarms.

    Args:
        config: Its objectives (``slo_latency_seconds``, ``slo_latency_target``,
            ``slo_availability_target``) and sampling period (``slo_interval``).
        metrics: Where the sends are counted; the monitor exports its state there too.
    """

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._log = EventLog(logger, config.node, "slo")
        bounds = metrics.send_latency.bounds
        if config.slo_latency_seconds not in bounds:
            raise ValueError("slo_latency_seconds must be a bound of the latency histogram")
        self._bucket = bounds.index(config.slo_latency_seconds)
        self.objectives = (BurnRate("send_latency", config.slo_latency_target),
                           BurnRate("send_availability", config.slo_availability_target))
        metrics.gauge("chatd_slo_alarm",
                      "1 while an objective's burn-rate alarm is raised, by severity.",
                      self._alarm_samples)
        metrics.gauge("chatd_slo_burn_rate",
                      "An objective's error-budget burn rate over a window (seconds).",
                      self._burn_samples)
        self._recent: collections.deque[tuple[float, tuple[int, ...]]] = collections.deque()
        metrics.gauge("chatd_sends_recent_per_second",
                      "Sends answered sent per second over the last minute.",
                      self._recent_rate)
        metrics.gauge("chatd_send_latency_recent_seconds",
                      "Send latency quantiles over the last minute: the upper bound of the "
                      "histogram bucket that holds each (0 without sends).",
                      self._recent_quantiles)

    def _alarm_samples(self) -> list[tuple[dict[str, str], float]]:
        return [({"objective": o.objective, "severity": w.severity},
                 float(w.severity in o.raised))
                for o in self.objectives for w in o.windows]

    def _burn_samples(self) -> list[tuple[dict[str, str], float]]:
        windows = sorted({s for w in WINDOWS for s in (w.long, w.short)})
        return [({"objective": o.objective, "window": f"{s:g}"}, o.burn(s))
                for o in self.objectives for s in windows]

    def _recent_delta(self) -> tuple[float, list[int]]:
        """Seconds between the oldest and newest recent samples, and the latency bucket
        counts added between them."""
        if len(self._recent) < 2:
            return 0.0, []
        (start, before), (end, after) = self._recent[0], self._recent[-1]
        return end - start, [b - a for a, b in zip(before, after, strict=True)]

    def _recent_rate(self) -> list[tuple[dict[str, str], float]]:
        seconds, counts = self._recent_delta()
        return [({}, sum(counts) / seconds if seconds else 0.0)]

    def _recent_quantiles(self) -> list[tuple[dict[str, str], float]]:
        _, counts = self._recent_delta()
        bounds = (*self._metrics.send_latency.bounds, float("inf"))
        total = sum(counts)
        samples = []
        for quantile in ("0.99", "0.9999"):
            value = 0.0
            if total:
                rank, running = float(quantile) * total, 0
                for bound, count in zip(bounds, counts, strict=True):
                    running += count
                    if running >= rank:
                        value = bound
                        break
            samples.append(({"quantile": quantile}, value))
        return samples

    def _counts(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(good, all) for the latency objective and for the availability one."""
        latency = self._metrics.send_latency
        answered = latency.count
        fast = sum(latency.counts[:self._bucket + 1])
        failed = self._metrics.send_failures
        return (fast, answered + failed), (answered, answered + failed)

    async def run(self, *, task_status: trio.TaskStatus[SloMonitor] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Sample now (the baseline), then every ``slo_interval`` seconds until cancelled."""
        task_status.started(self)
        while True:
            now = trio.current_time()
            for objective, (good, total) in zip(self.objectives, self._counts(), strict=True):
                for alarm in objective.sample(now, good, total):
                    self._report(alarm)
            self._recent.append((now, tuple(self._metrics.send_latency.counts)))
            while len(self._recent) > 1 and self._recent[1][0] <= now - RECENT:
                self._recent.popleft()
            await trio.sleep(self._config.slo_interval)

    def _report(self, alarm: Alarm) -> None:
        fields = {"objective": alarm.objective, "severity": alarm.severity,
                  "long_burn": round(alarm.long_burn, 3),
                  "short_burn": round(alarm.short_burn, 3)}
        if alarm.raised:
            self._log.warning("slo_burn", **fields)
        else:
            self._log.info("slo_burn_cleared", **fields)
