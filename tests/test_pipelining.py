"""A connection's outstanding sends share the durable store's fsync rounds (issue 14, goal 1).

The journal's write of one batch is held in its worker threads while the client sends more,
each in a WebSocket message of its own; once released, everything that arrived meanwhile
goes to disk in one more batch, in the order sent, and each ``sent`` answer comes only after
its batch was fsync'd on both replicas.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import RunningNode
from test_node import raw_login

from chatd.backends.embedded import _journal
from chatd.backends.embedded._format import RecordType
from chatd.backends.embedded._segments import Block, Position
from chatd.protocol import Send

MakeNode = Callable[..., Any]
TIMEOUT = 20.0


@pytest.fixture
def engine() -> str:
    """The durable store is the embedded engine's."""
    return "embedded"


class HeldJournal:
    """The journal's first batch of messages held in its worker threads until ``release``;
    every batch of messages written is noted in ``events``, in the order things happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        #: ("synced", batch number, (replica, messages)) and the test's own events.
        self.events: list[tuple[str, Any, Any]] = []
        self._batches: dict[bytes, int] = {}  # a batch's bytes (its LSNs: unique) -> number
        self._append_and_sync = _journal._append_and_sync
        monkeypatch.setattr(_journal, "_append_and_sync", self._held)

    def _held(self, log: Any, block: Block) -> list[Position]:
        types = [block.data[offset + 4] for offset in block.offsets]  # the header's type
        if RecordType.MSG not in types:  # presence and the like: not held, not counted
            return self._append_and_sync(log, block)
        number = self._batches.setdefault(block.data, len(self._batches))
        if number == 0:
            self.entered.set()
            self.gate.wait(TIMEOUT)
        positions = self._append_and_sync(log, block)
        self.events.append(("synced", number, (str(log.directory),
                                               types.count(RecordType.MSG))))
        return positions

    async def wait_held(self) -> None:
        """Wait until the first batch of messages is being written."""
        await trio.to_thread.run_sync(self.entered.wait, TIMEOUT)

    def messages_per_batch(self) -> dict[int, set[int]]:
        """How many messages each batch held, on each replica."""
        found: dict[int, set[int]] = {}
        for kind, number, detail in self.events:
            if kind == "synced":
                found.setdefault(number, set()).add(detail[1])
        return found


async def test_outstanding_sends_of_one_connection_share_one_fsync_round(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    node: RunningNode = await make_node(rate_limit=100_000.0, rate_burst=100_000)
    journal = HeldJournal(monkeypatch)
    gate, events = journal.gate, journal.events
    async with raw_login(node, "alice") as alice:
        await alice.send({"t": "send", "id": "m0", "to": "bob", "body": "first"})
        await journal.wait_held()
        for n in range(1, 100):
            await alice.send({"t": "send", "id": f"m{n}", "to": "bob", "body": f"more {n}"})
        gate.set()
        answers = []
        with trio.fail_after(TIMEOUT):
            while len(answers) < 100:
                frame = await alice.frame()
                assert frame["t"] == "sent", frame
                answers.append(frame["id"])
                events.append(("sent", frame["id"], None))
    assert answers == [f"m{n}" for n in range(100)]
    synced = [(number, detail) for kind, number, detail in events if kind == "synced"]
    # Two batches, each fsync'd on both replicas: the first send, then the 99 at once.
    assert sorted(number for number, _ in synced) == [0, 0, 1, 1]
    assert {detail[1] for number, detail in synced if number == 0} == {1}
    assert {detail[1] for number, detail in synced if number == 1} == {99}
    for number in (0, 1):
        assert len({detail[0] for n, detail in synced if n == number}) == 2  # both replicas
    # No sent before its batch was fsync'd on both replicas.
    for index, (kind, ident, _) in enumerate(events):
        if kind == "sent":
            batch = 0 if ident == "m0" else 1
            assert sum(1 for k, n, _ in events[:index] if k == "synced" and n == batch) == 2
    # The 99 went to bob's queue in the order sent.
    queued = await node.node.backend.queues.pending("bob", 0, 1000)
    assert [entry.item.id for entry in queued] == [f"m{n}" for n in range(100)]


async def test_the_reader_goes_on_while_a_write_is_in_flight_and_answers_keep_order(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the first send is being fsync'd, the connection's reader decodes the sends
    that follow (they are counted as they are acted on); a query after them is answered
    only after every one of their ``sent`` answers (docs/protocol.md, section 4.7)."""
    node: RunningNode = await make_node(rate_limit=100_000.0, rate_burst=100_000)
    journal = HeldJournal(monkeypatch)
    counted = node.node.metrics.frames_in
    async with raw_login(node, "alice") as alice:
        await alice.send({"t": "send", "id": "m0", "to": "bob", "body": "first"})
        await journal.wait_held()
        for n in range(1, 50):
            await alice.send({"t": "send", "id": f"m{n}", "to": "bob", "body": f"more {n}"})
        with trio.fail_after(TIMEOUT):
            while counted[Send.INDEX] < 50:  # acted on while m0's write is still held
                await trio.sleep(0.01)
        assert not journal.gate.is_set() and journal.messages_per_batch() == {}
        await alice.send({"t": "lastseen", "user": "carol"},
                         {"t": "send", "id": "m50", "to": "bob", "body": "last"})
        journal.gate.set()
        with trio.fail_after(TIMEOUT):
            answers = [await alice.frame() for _ in range(52)]
    assert [(a["t"], a.get("id")) for a in answers] == [
        *[("sent", f"m{n}") for n in range(50)], ("presence", None), ("sent", "m50")]
    # The 49 read while m0 was written went to disk together, then m50 alone.
    assert journal.messages_per_batch() == {0: {1}, 1: {49}, 2: {1}}
