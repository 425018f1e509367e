"""Sans-IO parts of the session, tested on plain numbers: the flood budget, the keepalive
schedule (docs/protocol.md 2.6) and the merging of acknowledgements.

The keepalive tests replay the three cases the hardening issue measured against the old
writer (pinged at 20, 38, 56 s while sending every 2 s; at 20, 60, 80 s while answering
pings; two pings 3 ms apart after a frame right after the hello) by stepping the schedule
the way the writer does: sleep until :attr:`Keepalive.deadline`, then :meth:`check`.
"""

from __future__ import annotations

import pytest

from chatd.protocol import Ack, LastSeenQuery, Send
from chatd.session._acks import merge_acks
from chatd.session._flood import TokenBucket
from chatd.session._keepalive import Keepalive, KeepaliveAction

PING, IDLE = KeepaliveAction.PING, KeepaliveAction.IDLE


def simulate(signs: list[float], *, pong_after: float | None, until: float,
             interval: float = 20.0, idle: float = 60.0) -> tuple[list[float], float | None]:
    """Run the writer's keepalive loop against a client.

    Args:
        signs: Times the client sends a data message (the hello is at 0).
        pong_after: Seconds after a ping that its pong arrives, or None for never.
        until: When to stop.

    Returns:
        The times of the pings, and the time the client was declared idle (or None).
    """
    data = sorted(signs)
    pongs: list[float] = []
    pings: list[float] = []
    keepalive = Keepalive(interval, idle, 0.0)

    def heard(now: float) -> float:
        return max([0.0, *(t for t in data if t <= now), *(t for t in pongs if t <= now)])

    while keepalive.deadline <= until:
        now = keepalive.deadline
        action = keepalive.check(now, heard(now))
        if action is PING:
            pings.append(now)
            if pong_after is not None:
                pongs.append(now + pong_after)
        elif action is IDLE:
            return pings, now
        assert keepalive.deadline > now  # never spins
    return pings, None


def test_client_sending_data_is_never_pinged() -> None:
    pings, idle = simulate([2.0 * k for k in range(1, 60)], pong_after=None, until=118.0)
    assert (pings, idle) == ([], None)


def test_silent_client_answering_pings_is_pinged_every_interval() -> None:
    pings, idle = simulate([], pong_after=0.005, until=90.0)
    assert pings == pytest.approx([20.0, 40.0, 60.0, 80.0])  # 5 ms early: within the slack
    assert idle is None


def test_quiet_connection_wakes_the_writer_once_per_ping() -> None:
    keepalive = Keepalive(20.0, 60.0, 0.0)
    wakes = pings = 0
    heard = 0.0
    while keepalive.deadline <= 200.0:
        now = keepalive.deadline
        wakes += 1
        if keepalive.check(now, heard) is PING:
            pings += 1
            heard = now + 0.05  # the pong, 50 ms later
    assert (pings, wakes) == (10, 10)


def test_frame_right_after_hello_does_not_draw_two_pings() -> None:
    pings, idle = simulate([0.003], pong_after=0.001, until=30.0)
    assert pings == pytest.approx([20.003], abs=0.2)  # at most ping_interval / 100 early
    assert idle is None


def test_silent_client_not_answering_is_idle_at_idle_timeout() -> None:
    pings, idle = simulate([], pong_after=None, until=200.0)
    assert pings == [20.0]
    assert idle == 60.0


def test_data_after_a_ping_keeps_the_client_alive() -> None:
    """A data message instead of a pong is a sign of life too; the next ping follows it."""
    pings, idle = simulate([30.0], pong_after=None, until=100.0)
    assert pings == [20.0, 50.0]
    assert idle == 90.0


def test_late_pong_resets_the_idle_deadline() -> None:
    pings, idle = simulate([], pong_after=35.0, until=125.0)
    assert pings == pytest.approx([20.0, 75.0], abs=0.2)  # pong at 55, next ping 20 s later
    assert idle is None


def test_token_bucket_covers_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=20, now=100.0)
    assert not bucket.would_wait(20, 100.0)
    assert bucket.spend(20, 100.0) == 0.0
    assert bucket.would_wait(1, 100.0)
    assert bucket.spend(5, 100.0) == pytest.approx(0.5)  # 5 frames owed at 10/s
    assert bucket.would_wait(1, 100.5)  # back at zero, not above
    assert not bucket.would_wait(1, 100.7)
    assert bucket.spend(1, 100.7) == 0.0


def test_token_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=1000.0, burst=5, now=0.0)
    assert not bucket.would_wait(5, 3600.0)
    assert bucket.would_wait(6, 3600.0)
    assert bucket.spend(6, 3600.0) == pytest.approx(0.001)


def test_token_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, now=50.0)
    bucket.spend(10, 50.0)
    assert bucket.spend(1, 40.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_token_bucket_refuses_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


def test_merge_acks_keeps_highest_read_and_higher_delivered() -> None:
    frames = [Ack("delivered", 3), Ack("read", 2), Ack("delivered", 7), Ack("read", 5)]
    assert merge_acks(list(frames)) == [Ack("read", 5), Ack("delivered", 7)]


def test_merge_acks_keeps_order_around_other_frames_and_peer_acks() -> None:
    send = Send("m1", "bob", "hi")
    frames = [Ack("delivered", 1), Ack("delivered", 2), send, Ack("read", 2, "bob"),
              Ack("read", 1), LastSeenQuery("bob"), Ack("delivered", 4)]
    assert merge_acks(frames) == [Ack("delivered", 2), send, Ack("read", 2, "bob"),
                                  Ack("read", 1), LastSeenQuery("bob"), Ack("delivered", 4)]


def test_merge_acks_drops_delivered_covered_by_read() -> None:
    assert merge_acks([Ack("delivered", 3), Ack("read", 4)]) == [Ack("read", 4)]
