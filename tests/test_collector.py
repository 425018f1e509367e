"""The garbage collector's schedule (``chatd.collector``): what survives a full pass is
frozen, so later passes skip it, until a thaw lets the next full pass free the reference
cycles that died frozen. Timers run on trio's virtual clock."""

from __future__ import annotations

import contextlib
import gc
import weakref

import trio

from chatd.collector import Collector


class Linked:
    """An object that can be part of a reference cycle, and can be watched by weakref."""

    __slots__ = ("__weakref__", "other")

    def __init__(self) -> None:
        self.other: Linked | None = None


def pair() -> Linked:
    """Two objects referring to each other: only the cyclic collector frees them."""
    first, second = Linked(), Linked()
    first.other, second.other = second, first
    return first


async def test_a_cycle_that_died_frozen_waits_for_the_thaw(
        autojump_clock: trio.testing.MockClock) -> None:
    collector = Collector(thaw_interval=60.0)
    with contextlib.closing(collector):
        collector.install()
        assert gc.get_freeze_count() > 0  # everything alive at start
        kept = pair()
        watched = weakref.ref(kept)
        gc.collect()  # a full pass, which the cycle survives: frozen after it
        assert collector.freezes >= 1
        del kept
        gc.collect()
        assert watched() is not None  # frozen: full passes skip it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            await trio.sleep(59.0)
            assert collector.thaws == 0
            await trio.sleep(2.0)
            assert collector.thaws == 1
            nursery.cancel_scope.cancel()
        gc.collect()  # the first full pass after the thaw visits everything
        assert watched() is None


async def test_frozen_objects_without_cycles_are_freed_at_once() -> None:
    collector = Collector()
    with contextlib.closing(collector):
        collector.install()
        alone = Linked()
        watched = weakref.ref(alone)
        gc.collect()  # frozen now
        del alone
        assert watched() is None


async def test_close_stops_freezing_and_thaws_everything() -> None:
    collector = Collector()
    collector.install()
    collector.close()
    assert gc.get_freeze_count() == 0
    kept = pair()
    watched = weakref.ref(kept)
    gc.collect()
    del kept
    gc.collect()
    assert watched() is None
