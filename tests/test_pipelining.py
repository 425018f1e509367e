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
from chatd.backends.embedded._durable import RecordType

MakeNode = Callable[..., Any]
TIMEOUT = 20.0


@pytest.fixture
def engine() -> str:
    """The durable store is the embedded engine's."""
    return "embedded"


async def test_outstanding_sends_of_one_connection_share_one_fsync_round(
        make_node: MakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    node: RunningNode = await make_node(rate_limit=100_000.0, rate_burst=100_000)
    gate, entered = threading.Event(), threading.Event()
    events: list[tuple[str, Any, Any]] = []  # in the order they happened, any thread
    batches: dict[int, int] = {}  # id of a batch's record list -> its number
    append_and_sync = _journal._append_and_sync

    def held(log: Any, records: list[tuple[int, bytes]]) -> None:
        if not any(record_type == RecordType.MSG for record_type, _ in records):
            append_and_sync(log, records)  # presence and the like: not held, not counted
            return
        number = batches.setdefault(id(records), len(batches))
        if number == 0:
            entered.set()
            gate.wait(TIMEOUT)
        append_and_sync(log, records)
        events.append(("synced", number, (str(log.directory),
                                          sum(t == RecordType.MSG for t, _ in records))))

    monkeypatch.setattr(_journal, "_append_and_sync", held)
    async with raw_login(node, "alice") as alice:
        await alice.send({"t": "send", "id": "m0", "to": "bob", "body": "first"})
        await trio.to_thread.run_sync(entered.wait, TIMEOUT)
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
