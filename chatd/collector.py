"""The garbage collector's schedule in a ``chatd serve`` process: full passes that visit
what is new, not every session the node holds.

CPython's cyclic collector stops the whole process while a full pass visits every object
it tracks, and it runs one each time the objects that survived its younger passes grow
by a quarter. Most of a node's tracked objects are long-lived: its modules and
supervision tree, and each idle session (about a hundred objects: its tasks, coroutines,
cancel scopes, WebSocket). While a worker fills with sessions, every quarter of growth
brings a full pass over all of them: at 12,000 sessions a worker spent more than half of
some seconds in the collector, and answers from NATS waited long enough behind it for
logins to be refused ``store_unavailable`` and held sessions to be closed.

:class:`Collector` keeps full passes to what is new:

- At start it collects once and freezes everything alive (``gc.freeze``): the modules,
  the node's tree, a recovered store.
- After each full pass it freezes what survived that pass, so the next ones skip it.
- Every :data:`THAW_INTERVAL` seconds it thaws (``gc.unfreeze``): the next full pass
  visits everything once, frees any reference cycle among objects that died while frozen,
  and its survivors are frozen again. A frozen object is still freed as soon as nothing
  refers to it; only objects in reference cycles wait for the thaw. Sessions end without
  cycles (``tests/test_node.py``); the thaw bounds how long any other cycle outlives its
  use.

It is process-wide, so ``chatd serve`` runs it, not :class:`~chatd.node.Node` (tests run
several nodes in one process).
"""

from __future__ import annotations

import gc
from typing import Any

import attrs
import trio

__all__ = ["THAW_INTERVAL", "Collector"]

#: Seconds between two thaws: at most this long (plus the time to the next full pass) does
#: a reference cycle among frozen objects outlive them.
THAW_INTERVAL = 600.0


@attrs.define(eq=False)
class Collector:
    """The collector's schedule (see the module's description).

    Attributes:
        thaw_interval: Seconds between two thaws.
        freezes: Full passes whose survivors were frozen.
        thaws: Thaws so far.
    """

    thaw_interval: float = THAW_INTERVAL
    freezes: int = 0
    thaws: int = 0
    _installed: bool = attrs.field(default=False, init=False)

    def install(self) -> None:
        """Collect and freeze everything alive now, and freeze the survivors of every full
        pass from now on."""
        gc.collect()
        gc.freeze()
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def close(self) -> None:
        """Stop freezing, and thaw everything (the collector's own schedule again); a
        no-op if not installed."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False
            gc.unfreeze()

    async def run(self) -> None:
        """Thaw every :attr:`thaw_interval` seconds, until cancelled."""
        while True:
            await trio.sleep(self.thaw_interval)
            gc.unfreeze()
            self.thaws += 1

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A collector callback: after a full pass the younger generations are empty and
        the oldest holds exactly what survived it, which is frozen."""
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()
            self.freezes += 1
