"""Tests for the actor runtime: mailboxes, the actor table and the one_for_one supervisor.

Every wait on another task goes through :class:`Counter` or :func:`settle`, both bounded
by ``trio.fail_after``, so a regression fails the test quickly instead of hanging it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import pytest
import trio
import trio.testing

from chatd.actors import (
    ActorTable,
    Address,
    ChildSpec,
    Mailbox,
    Restart,
    RestartIntensityExceeded,
    Supervisor,
)

TIMEOUT = 5.0
"""Real-time deadline (seconds) for any single wait in a test."""

VIRTUAL_TIMEOUT = 600.0
"""Deadline for waits under ``autojump_clock``, where time is virtual and jumps ahead."""

ChildFn = Callable[..., Awaitable[None]]
Ending = Literal["serve", "crash", "return"]


class Boom(Exception):
    """The crash raised by test children."""


class Counter:
    """A count that tasks can wait on, with a deadline."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = trio.Event()

    def bump(self) -> None:
        self.value += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> None:
        """Return once the count reaches ``n``; fail the test after ``timeout`` seconds."""
        with trio.fail_after(timeout):
            while self.value < n:
                await self._changed.wait()


class Probe:
    """What a test child records: how often it started and how often it was cancelled."""

    def __init__(self) -> None:
        self.starts = Counter()
        self.cancels = Counter()


async def settle() -> None:
    """Wait until every other task is blocked, i.e. the supervisor has made its decision."""
    with trio.fail_after(TIMEOUT):
        await trio.testing.wait_all_tasks_blocked()


def child(probe: Probe, *, ends: Ending = "serve", times: float = math.inf,
          delay: float = 0.0, handle: Any = None) -> ChildFn:
    """A child that starts with ``handle``, waits ``delay`` s, then ends as ``ends`` says.

    It ends that way during its first ``times`` runs, then serves forever.
    """

    async def start(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        probe.starts.bump()
        run = probe.starts.value
        task_status.started(handle)
        try:
            await trio.sleep(delay)
            if run <= times:
                if ends == "crash":
                    raise Boom(f"run {run}")
                if ends == "return":
                    return
            await trio.sleep_forever()
        except trio.Cancelled:
            probe.cancels.bump()
            raise

    return start


def fails_before_started() -> ChildFn:
    """A child that crashes before it ever calls ``task_status.started``."""

    async def start(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(0)
        raise Boom("before started")

    return start


def spec(name: str, fn: ChildFn, restart: Restart = Restart.PERMANENT) -> ChildSpec:
    return ChildSpec(name=name, start=fn, restart=restart)


def new_mailbox(capacity: int = 3) -> Mailbox[Any]:
    return Mailbox(Address("node-a", 1, "test"), capacity)


# --------------------------------------------------------------------------- Mailbox


def test_deliver_nowait_refuses_when_full() -> None:
    mailbox = new_mailbox(capacity=3)
    assert [mailbox.deliver_nowait(i) for i in range(3)] == [True, True, True]
    assert mailbox.deliver_nowait(3) is False
    assert mailbox.receive_nowait() == 0
    assert mailbox.deliver_nowait(4) is True


def test_deliver_nowait_refuses_after_close() -> None:
    mailbox = new_mailbox()
    mailbox.close()
    assert mailbox.deliver_nowait("late") is False


async def test_deliver_after_close_raises_broken() -> None:
    mailbox = new_mailbox()
    mailbox.close()
    with pytest.raises(trio.BrokenResourceError):
        await mailbox.deliver("late")


async def test_receive_is_fifo() -> None:
    mailbox = new_mailbox(capacity=5)
    for message in ["a", "b", "c"]:
        assert mailbox.deliver_nowait(message)
    await mailbox.deliver("d")
    with trio.fail_after(TIMEOUT):
        received = [await mailbox.receive() for _ in range(3)]
    assert received == ["a", "b", "c"]
    assert mailbox.receive_nowait() == "d"
    with pytest.raises(trio.WouldBlock):
        mailbox.receive_nowait()


async def test_exit_cancels_bound_scope_even_when_full() -> None:
    mailbox = new_mailbox(capacity=2)
    done = trio.Event()
    caught: list[bool] = []

    async def actor(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            mailbox.bind(scope)
            task_status.started()
            await trio.sleep_forever()
        caught.append(scope.cancelled_caught)
        done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(actor)
        while mailbox.deliver_nowait("spam"):
            pass
        mailbox.exit("too slow")
        with trio.fail_after(TIMEOUT):
            await done.wait()
    assert caught == [True]
    assert mailbox.exit_reason == "too slow"


def test_exit_unbound_records_reason_only() -> None:
    mailbox = new_mailbox()
    mailbox.exit("bye")
    assert mailbox.exit_reason == "bye"
    assert mailbox.deliver_nowait("still queued") is True


def test_first_exit_reason_sticks() -> None:
    mailbox = new_mailbox()
    scope = trio.CancelScope()
    mailbox.bind(scope)
    mailbox.exit("first")
    mailbox.exit("second")
    assert mailbox.exit_reason == "first"
    assert scope.cancel_called


async def test_bind_after_exit_cancels_immediately() -> None:
    mailbox = new_mailbox()
    mailbox.exit("early")
    scope = trio.CancelScope()
    mailbox.bind(scope)
    assert scope.cancel_called
    with trio.fail_after(TIMEOUT), scope:
        await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_inline_handler_failure_is_the_recipients_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """A recipient's inline handler that raises does not raise in the delivering task: the
    recipient is told to exit with the exception, its task is woken, and it is logged."""
    mailbox = new_mailbox()
    broken = Boom("inline write failed")
    calls: list[int] = []

    def inline() -> bool:
        calls.append(1)
        raise broken

    woken = trio.Event()
    exits: list[Any] = []

    async def actor(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            mailbox.bind(scope, lambda: exits.append(mailbox.exit_reason))
            mailbox.inline = inline
            task_status.started()
            await mailbox.receive()
        woken.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(actor)
        await settle()
        assert mailbox.deliver_nowait("one") is True  # the sender goes on: no exception
        assert mailbox.deliver_nowait("two") is True
        with trio.fail_after(TIMEOUT):
            await woken.wait()
    assert calls == [1]  # the broken handler was removed after its first failure
    assert mailbox.inline is None
    assert mailbox.exit_reason is broken and exits == [broken]
    failed = [r for r in caplog.records if r.getMessage() == "inline_failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None


# --------------------------------------------------------------------------- ActorTable


def test_open_gives_distinct_addresses_on_the_node() -> None:
    table = ActorTable("node-a")
    boxes = [table.open(f"actor{i}", 4) for i in range(3)]
    addresses = [box.address for box in boxes]
    assert len(set(addresses)) == 3
    assert {address.node for address in addresses} == {"node-a"}
    assert [address.name for address in addresses] == ["actor0", "actor1", "actor2"]
    assert [box.capacity for box in boxes] == [4, 4, 4]
    assert len(table) == 3
    assert all(table.lookup(box.address) is box for box in boxes)


def test_lookup_from_another_node_is_none() -> None:
    table = ActorTable("node-a")
    box = table.open("actor", 1)
    foreign = Address("node-b", box.address.serial, box.address.name)
    assert table.lookup(foreign) is None
    assert table.exit(foreign, "bye") is False
    assert box.exit_reason is None


def test_lookup_ignores_address_name() -> None:
    table = ActorTable("node-a")
    box = table.open("session:alice", 1)
    assert table.lookup(Address("node-a", box.address.serial, "renamed")) is box


def test_lookup_and_exit_reach_a_live_address() -> None:
    table = ActorTable("node-a")
    box = table.open("actor", 1)
    assert table.lookup(box.address) is box
    assert table.exit(box.address, "stop") is True
    assert box.exit_reason == "stop"


def test_released_address_is_gone() -> None:
    table = ActorTable("node-a")
    box = table.open("actor", 1)
    keep = table.open("other", 1)
    table.release(box)
    assert table.lookup(box.address) is None
    assert table.exit(box.address, "bye") is False
    assert box.exit_reason is None
    assert box.deliver_nowait("direct") is False
    assert list(table) == [keep]


def test_serials_are_not_reused_after_release() -> None:
    table = ActorTable("node-a")
    first = table.open("actor", 1)
    table.release(first)
    second = table.open("actor", 1)
    assert second.address != first.address
    assert table.lookup(first.address) is None


def test_address_equality_ignores_name() -> None:
    plain = Address("node-a", 7)
    named = Address("node-a", 7, "session:alice")
    assert plain == named
    assert hash(plain) == hash(named)
    assert plain != Address("node-a", 8)
    assert plain != Address("node-b", 7)
    assert str(named) == "session:alice@node-a#7"
    assert str(plain) == "actor@node-a#7"


# --------------------------------------------------------------------------- Supervisor


async def test_permanent_child_that_crashes_is_restarted() -> None:
    probe = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("worker", child(probe, ends="crash", times=2))])
        await probe.starts.wait_for(3)
        await settle()
        assert probe.starts.value == 3
        assert sup.children == ["worker"]
        nursery.cancel_scope.cancel()


async def test_permanent_child_that_returns_is_restarted() -> None:
    probe = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("worker", child(probe, ends="return", times=1))])
        await probe.starts.wait_for(2)
        assert sup.children == ["worker"]
        nursery.cancel_scope.cancel()


async def test_transient_child_that_returns_is_not_restarted() -> None:
    probe = Probe()
    sibling = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [
            spec("worker", child(probe, ends="return", times=1), Restart.TRANSIENT),
            spec("sibling", child(sibling)),
        ])
        await settle()
        assert probe.starts.value == 1
        assert sup.children == ["sibling"]
        nursery.cancel_scope.cancel()


async def test_transient_child_that_crashes_is_restarted() -> None:
    probe = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [
            spec("worker", child(probe, ends="crash", times=1), Restart.TRANSIENT),
        ])
        await probe.starts.wait_for(2)
        assert sup.children == ["worker"]
        nursery.cancel_scope.cancel()


async def test_temporary_child_that_crashes_is_not_restarted() -> None:
    probe = Probe()
    sibling = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [
            spec("sibling", child(sibling)),
            spec("worker", child(probe, ends="crash", times=1), Restart.TEMPORARY),
        ])
        await settle()
        assert probe.starts.value == 1
        assert sup.children == ["sibling"]
        assert (sibling.starts.value, sibling.cancels.value) == (1, 0)
        nursery.cancel_scope.cancel()
    assert sibling.cancels.value == 1


async def test_crash_does_not_touch_siblings() -> None:
    probe = Probe()
    sibling = Probe()
    sup = Supervisor("sup", intensity=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [
            spec("sibling", child(sibling)),
            spec("worker", child(probe, ends="crash", times=3)),
        ])
        await probe.starts.wait_for(4)
        await settle()
        assert (sibling.starts.value, sibling.cancels.value) == (1, 0)
        assert sorted(sup.children) == ["sibling", "worker"]
        nursery.cancel_scope.cancel()


async def test_too_many_restarts_escalate_and_cancel_siblings() -> None:
    probe = Probe()
    sibling = Probe()
    sup = Supervisor("sup", intensity=2, period=10.0)
    specs = [spec("sibling", child(sibling)), spec("worker", child(probe, ends="crash"))]
    with trio.fail_after(TIMEOUT), pytest.RaisesGroup(RestartIntensityExceeded) as info:
        await sup.run(specs)
    error = info.value.exceptions[0]
    assert isinstance(error, RestartIntensityExceeded)
    assert (error.supervisor, error.child) == ("sup", "worker")
    assert probe.starts.value == sup.intensity + 1
    assert (sibling.starts.value, sibling.cancels.value) == (1, 1)
    assert sup.children == []


async def test_restarts_spread_over_the_period_do_not_escalate(
        autojump_clock: trio.testing.MockClock) -> None:
    probe = Probe()
    sup = Supervisor("sup", intensity=2, period=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("worker", child(probe, ends="crash", times=8,
                                                            delay=3.0))])
        await probe.starts.wait_for(9, timeout=VIRTUAL_TIMEOUT)
        assert trio.current_time() >= 8 * 3.0
        assert sup.children == ["worker"]
        nursery.cancel_scope.cancel()


async def test_restarts_within_the_period_escalate(
        autojump_clock: trio.testing.MockClock) -> None:
    """The same set-up as the test above, with crashes closer together, does escalate."""
    probe = Probe()
    sup = Supervisor("sup", intensity=2, period=5.0)
    with (trio.fail_after(VIRTUAL_TIMEOUT),
          pytest.RaisesGroup(RestartIntensityExceeded)):
        await sup.run([spec("worker", child(probe, ends="crash", times=8, delay=1.0))])
    assert probe.starts.value == 3


async def test_terminated_child_is_not_restarted() -> None:
    probe = Probe()
    sibling = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("worker", child(probe)), spec("sibling",
                                                                         child(sibling))])
        assert sup.terminate_child("worker") is True
        await probe.cancels.wait_for(1)
        await settle()
        assert probe.starts.value == 1
        assert sup.children == ["sibling"]
        assert sibling.cancels.value == 0
        assert sup.terminate_child("worker") is False
        nursery.cancel_scope.cancel()


def test_terminate_unknown_child_returns_false() -> None:
    assert Supervisor("sup").terminate_child("nobody") is False


async def test_cancelled_supervisor_does_not_restart_children() -> None:
    probes = [Probe(), Probe()]
    sup = Supervisor("sup")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run, [
                spec("permanent", child(probes[0])),
                spec("transient", child(probes[1]), Restart.TRANSIENT),
            ])
            nursery.cancel_scope.cancel()
    assert [(p.starts.value, p.cancels.value) for p in probes] == [(1, 1), (1, 1)]
    assert sup.children == []


async def test_run_hands_back_the_supervisor() -> None:
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        assert await nursery.start(sup.run, []) is sup
        nursery.cancel_scope.cancel()


async def test_start_child_returns_the_started_handle() -> None:
    handle = object()
    probe = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("static", child(Probe()))])
        assert await sup.start_child(spec("dynamic", child(probe, handle=handle))) is handle
        assert sorted(sup.children) == ["dynamic", "static"]
        assert probe.starts.value == 1
        nursery.cancel_scope.cancel()


async def test_dynamic_child_is_supervised() -> None:
    probe = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [])
        handle = await sup.start_child(spec("dynamic", child(probe, ends="crash", times=1,
                                                             handle="first")))
        assert handle == "first"
        await probe.starts.wait_for(2)
        assert sup.children == ["dynamic"]
        nursery.cancel_scope.cancel()


async def test_start_child_with_duplicate_name_fails() -> None:
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("worker", child(Probe()))])
        with pytest.raises(ValueError, match="worker"):
            await sup.start_child(spec("worker", child(Probe())))
        assert sup.children == ["worker"]
        nursery.cancel_scope.cancel()


async def test_start_child_before_run_fails() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        await Supervisor("sup").start_child(spec("worker", child(Probe())))


async def test_child_failing_before_started_fails_start_child() -> None:
    sibling = Probe()
    sup = Supervisor("sup")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run, [spec("sibling", child(sibling))])
        with trio.fail_after(TIMEOUT), pytest.raises(Boom, match="before started"):
            await sup.start_child(spec("early", fails_before_started()))
        await settle()
        assert sup.children == ["sibling"]
        assert sibling.cancels.value == 0
        nursery.cancel_scope.cancel()


async def test_child_failing_before_started_fails_run() -> None:
    later = Probe()
    sup = Supervisor("sup")
    specs = [spec("early", fails_before_started()), spec("later", child(later))]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT), pytest.RaisesGroup(pytest.RaisesExc(Boom)):
            await nursery.start(sup.run, specs)
    assert later.starts.value == 0
    assert sup.children == []
