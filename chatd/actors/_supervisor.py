"""A one_for_one supervisor with declared child specs and a restart intensity.

Children are declared as :class:`ChildSpec` records. A child is an async function that takes
``task_status`` and calls ``task_status.started(handle)`` once it can serve; the supervisor
starts its children in order, each only after the previous one has started, and hands the
first handle of each to whoever started it.

When a child ends, its restart type decides (as in OTP):

- ``PERMANENT``: restarted whether it crashed or returned;
- ``TRANSIENT``: restarted only if it crashed (raised an ``Exception``);
- ``TEMPORARY``: never restarted.

Cancellation is not a crash: a child that raises ``trio.Cancelled`` is never restarted.
A crash of one child never touches its siblings (one_for_one). If more than ``intensity``
restarts happen within ``period`` seconds, the supervisor gives up: it cancels all its
children and raises :class:`RestartIntensityExceeded`, so its own parent decides.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from chatd.logs import EventLog

__all__ = ["ChildSpec", "Restart", "RestartIntensityExceeded", "Supervisor"]

logger = logging.getLogger(__name__)


class Restart(enum.Enum):
    """When a supervisor restarts a child that has ended."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


@attrs.frozen
class ChildSpec:
    """How to start one child and when to restart it.

    Args:
        name: Unique among the supervisor's children; used in logs.
        start: ``async def start(*, task_status)``; calls ``task_status.started(handle)``.
        restart: The restart type.
    """

    name: str
    start: Callable[..., Awaitable[Any]]
    restart: Restart = Restart.PERMANENT


class RestartIntensityExceeded(Exception):
    """A supervisor saw too many restarts too quickly and gave up."""

    def __init__(self, supervisor: str, child: str, restarts: int, period: float) -> None:
        super().__init__(f"supervisor {supervisor!r}: child {child!r} restarted more than "
                         f"{restarts} times in {period} s")
        self.supervisor = supervisor
        self.child = child


class _Status:
    """Wraps the parent's task_status for a child's first start; ignores later starts."""

    __slots__ = ("_parent", "started_once")

    def __init__(self, parent: trio.TaskStatus[Any]) -> None:
        self._parent = parent
        self.started_once = False

    def started(self, value: Any = None) -> None:
        if not self.started_once:
            self.started_once = True
            self._parent.started(value)


class Supervisor:
    """Supervises children one_for_one.

    Args:
        name: The supervisor's name, used in logs and errors.
        node: The node name put on log records.
        intensity: Restarts allowed within ``period`` before the supervisor gives up.
        period: The window, in seconds, over which restarts are counted.
    """

    def __init__(self, name: str, *, node: str = "-", intensity: int = 3,
                 period: float = 5.0) -> None:
        self.name = name
        self.intensity = intensity
        self.period = period
        self._log = EventLog(logger, node, f"supervisor:{name}")
        self._restarts: collections.deque[float] = collections.deque()
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}

    async def run(self, children: Sequence[ChildSpec] = (), *,
                  task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        """Start ``children`` in order, then supervise until cancelled or giving up.

        Raises:
            RestartIntensityExceeded: Too many restarts within the period (inside an
                exception group, as trio nurseries raise).
            Exception: A child failed before it first started.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for spec in children:
                await nursery.start(self._supervise, spec)
            task_status.started(self)
            await trio.sleep_forever()

    async def start_child(self, spec: ChildSpec) -> Any:
        """Start one more child under this running supervisor and return its handle."""
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        return await self._nursery.start(self._supervise, spec)

    def terminate_child(self, name: str) -> bool:
        """Cancel a child; a terminated child is not restarted. False if there is none."""
        scope = self._scopes.get(name)
        if scope is None:
            return False
        scope.cancel()
        return True

    @property
    def children(self) -> list[str]:
        """Names of the children currently running."""
        return list(self._scopes)

    async def _supervise(self, spec: ChildSpec, *,
                         task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        if spec.name in self._scopes:
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.name!r}")
        status = _Status(task_status)
        try:
            while True:
                crashed = False
                scope = self._scopes[spec.name] = trio.CancelScope()
                with scope:
                    try:
                        await spec.start(task_status=status)
                        if not status.started_once:
                            raise RuntimeError(f"child {spec.name!r} returned before it started")
                    except Exception:
                        if not status.started_once:
                            raise
                        crashed = True
                        self._log.error("child_crashed", error="child_crashed",
                                        child=spec.name, exc_info=True)
                if scope.cancel_called:
                    return
                if spec.restart is Restart.TEMPORARY or (
                        spec.restart is Restart.TRANSIENT and not crashed):
                    return
                self._count_restart(spec.name)
                self._log.info("child_restarted", child=spec.name, restart=spec.restart.value)
        finally:
            self._scopes.pop(spec.name, None)

    def _count_restart(self, child: str) -> None:
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.period:
            self._restarts.popleft()
        if len(self._restarts) > self.intensity:
            self._log.error("restart_intensity_exceeded", error="restart_intensity_exceeded",
                            child=child, intensity=self.intensity, period=self.period)
            raise RestartIntensityExceeded(self.name, child, self.intensity, self.period)
