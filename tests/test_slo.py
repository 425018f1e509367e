"""The send objectives' burn-rate alarms: the sans-IO arithmetic on plain numbers, and a
real node on trio's virtual clock whose store is slowed until the latency alarm fires, then
sped up again until it clears."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from test_node import login

from chatd.backends.embedded._memory import MemoryStore
from chatd.config import ConfigError, load_config
from chatd.slo import WINDOWS, Alarm, BurnRate

MakeNode = Callable[..., Any]


def test_no_events_burn_nothing() -> None:
    rate = BurnRate("send_latency", 0.9999)
    assert rate.sample(0.0, 0, 0) == [] and rate.burn(3600.0) == 0.0


def test_burn_rate_is_the_missed_share_over_the_budget() -> None:
    rate = BurnRate("send_latency", 0.99)
    rate.sample(0.0, 0, 0)
    rate.sample(60.0, 990, 1000)  # 1% missed: exactly the budget
    assert rate.burn(3600.0) == pytest.approx(1.0)
    rate.sample(120.0, 990, 1100)  # then 100 events, all missed
    assert rate.burn(60.0) == pytest.approx(100.0)
    assert rate.burn(3600.0) == pytest.approx(110 / 1100 / 0.01)


def test_alarm_needs_both_windows_and_clears_with_the_short_one() -> None:
    rate = BurnRate("send_latency", 0.9999)
    page = WINDOWS[0]
    good = total = 0
    changes: list[Alarm] = []
    for minute in range(0, 61):  # an hour of good traffic
        good += 1000
        total += 1000
        changes += rate.sample(minute * 60.0, good, total)
    assert changes == []
    total += 100  # a burst of slow sends: 100 of 61,100 in the hour, all in the last minute
    changes += rate.sample(61 * 60.0, good, total)
    assert [(a.severity, a.raised) for a in changes] == [("page", True), ("ticket", True)]
    assert changes[0].long_burn > page.factor and changes[0].short_burn > page.factor
    changes = []
    for minute in range(62, 62 + 6):  # five minutes of good traffic again
        good += 1000
        total += 1000
        changes += rate.sample(minute * 60.0, good, total)
    assert ("page", False) in [(a.severity, a.raised) for a in changes]
    assert "page" not in rate.raised


def test_objectives_are_checked(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="slo_latency_target"):
        load_config(data_dir=tmp_path, slo_latency_target=1.0)
    with pytest.raises(ConfigError, match="slo_latency_seconds"):
        load_config(data_dir=tmp_path, slo_latency_seconds=0.006)
    with pytest.raises(ValueError):
        BurnRate("x", 0.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time: it jumps ahead once every task has waited 20 ms of real time."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_latency_alarm_fires_on_a_slow_store_and_clears(
        make_node: MakeNode, clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatd")
    node = await make_node(store="memory")
    submit_many = MemoryStore.submit_many

    async def slow_submit_many(self: MemoryStore, messages: Any) -> Any:
        await trio.sleep(0.008)  # 8 ms: over the 5 ms objective
        return await submit_many(self, messages)

    def events(name: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == name]

    async with login(node, "alice") as alice, login(node, "bob"):
        for n in range(5):
            await alice.client.send("bob", f"fast {n}")
        monkeypatch.setattr(MemoryStore, "submit_many", slow_submit_many)
        for n in range(20):
            await alice.client.send("bob", f"slow {n}")
        with trio.fail_after(120):
            while not events("slo_burn"):
                await trio.sleep(5)
        (raised, *_) = events("slo_burn")
        fields = raised.__dict__["chatd_fields"]
        assert (fields["objective"], fields["severity"]) == ("send_latency", "page")
        assert node.node.slo.objectives[0].raised == {"page", "ticket"}
        assert "page" not in node.node.slo.objectives[1].raised  # no send failed

        monkeypatch.setattr(MemoryStore, "submit_many", submit_many)
        with trio.fail_after(3600):
            while "page" in node.node.slo.objectives[0].raised:
                await alice.client.send("bob", "fast again")
                await trio.sleep(10)
        cleared = events("slo_burn_cleared")
        assert [r.__dict__["chatd_fields"]["severity"] for r in cleared][:1] == ["page"]
