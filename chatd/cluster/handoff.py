"""Hand-offs: after a membership change, each queue's copies meet at its leader.

Run by the ``replicas`` actor once at start and after every membership change:

- a queue this node holds but does not lead is sent to its leader (``merge``); if this
  node is no longer one of the queue's replicas (it held a hinted copy, or placement
  moved), it drops the queue once the leader has it;
- a queue this node leads is completed with its follower's copy (``pull``);
- the leader merges (:func:`chatd.cluster.merge.merge_states`), replaces its own copy with
  the result, sets its follower to it (``set``) and offers the entries to the user's
  session, holding the queue alone meanwhile (:class:`chatd.cluster.gates.QueueGates`).

Every run logs ``handoff_done``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from chatd.logs import EventLog
from chatd.store import Entry, ReplicaStore, UserState

from .calls import PeerGone, Refused
from .gates import QueueGates
from .merge import EMPTY, merge_states, pack_state, unpack_state
from .placement import Placement

__all__ = ["BATCH_ENTRIES", "Handoff"]

#: Users' states carried by one merge, pull or set frame at most (by pending entries).
BATCH_ENTRIES = 5000
#: Users whose copies one pull asks for at most.
PULL_USERS = 500

#: Sends a request to a peer and returns its answer.
Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Handoff:
    """Brings the copies of the queues a node holds together at their leaders.

    Args:
        node: This node's name.
        local: This node's own store.
        placement: Where queues live, as this node sees it.
        call: Sends a request to a peer (:meth:`chatd.cluster.calls.Calls.call`).
        gates: The write and merge gates of the queues this node leads.
        offer: Offers a stored entry to the user's session, wherever it is.
        log: Where ``handoff_done`` goes.
    """

    def __init__(self, node: str, local: ReplicaStore, placement: Placement, call: Call,
                 gates: QueueGates, offer: Callable[[str, Entry], None],
                 log: EventLog) -> None:
        self.node = node
        self.local = local
        self.placement = placement
        self._call = call
        self._gates = gates
        self._offer = offer
        self._log = log
        #: Completed hand-offs (for tests and metrics).
        self.count = 0

    async def merge(self, states: Mapping[str, UserState]) -> None:
        """Merge other replicas' states into the queues this node leads; set both replicas.

        Queues this node does not lead (placement moved again) are passed to their leader.
        """
        mine = {u: s for u, s in states.items()
                if self.placement.replicas(u)[:1] == [self.node]}
        others = {u: s for u, s in states.items() if u not in mine}
        if others:
            await self._push(others)
        if not mine:
            return
        async with self._gates.merging(list(mine)):
            current = self.local.index.export(list(mine))
            merged = {u: merge_states(current[u], s) for u, s in mine.items()}
            followers: dict[str, dict[str, UserState]] = {}
            for user, state in merged.items():
                replicas = self.placement.replicas(user)
                if len(replicas) > 1:
                    followers.setdefault(replicas[1], {})[user] = state
            await self.local.replace(merged)
            for user, state in merged.items():
                for entry in state.entries:  # what the user's session may not have
                    self._offer(user, entry)
            for follower, group in followers.items():
                with contextlib.suppress(PeerGone, Refused):
                    await self._call(follower, {"op": "set", "states": {
                        u: pack_state(s) for u, s in group.items()}})

    async def _push(self, states: Mapping[str, UserState]) -> None:
        """Send states to the leaders of their queues, in batches."""
        by_leader: dict[str, dict[str, UserState]] = {}
        for user, state in states.items():
            replicas = self.placement.replicas(user)
            if replicas and replicas[0] != self.node:
                by_leader.setdefault(replicas[0], {})[user] = state
        for leader, group in by_leader.items():
            for batch in _batches(group):
                await self._call(leader, {"op": "merge", "states": {
                    u: pack_state(s) for u, s in batch.items()}})

    async def run(self, is_up: Callable[[str], bool]) -> None:
        """Bring every queue held here together with its other replica, and let go of
        queues this node is no longer a replica of."""
        index = self.local.index
        push: dict[str, list[str]] = {}
        pull: dict[str, list[str]] = {}
        for user in index.names():
            replicas = self.placement.replicas(user)
            if not replicas:
                continue
            if replicas[0] != self.node:
                push.setdefault(replicas[0], []).append(user)
            elif len(replicas) > 1:
                pull.setdefault(replicas[1], []).append(user)
        pushed = pulled = dropped = failed = 0
        for leader, users in push.items():
            for batch in _batches(index.export(users)):
                try:
                    await self._call(leader, {"op": "merge", "states": {
                        u: pack_state(s) for u, s in batch.items()}})
                except (PeerGone, Refused):
                    failed += len(batch)
                    continue
                pushed += len(batch)
                gone = {u: EMPTY for u in batch if self.node not in self.placement.replicas(u)}
                if gone:
                    await self.local.replace(gone)
                    dropped += len(gone)
        for follower, users in pull.items():
            for start in range(0, len(users), PULL_USERS):
                asked = users[start:start + PULL_USERS]
                try:
                    reply = await self._call(follower, {"op": "pull", "users": asked})
                    states = {str(u): unpack_state(str(u), s)
                              for u, s in reply["states"].items()}
                    await self.merge(states)
                except (PeerGone, Refused):
                    failed += len(asked)
                    continue
                pulled += len(states)
        self.count += 1
        self._log.info("handoff_done", pushed=pushed, pulled=pulled, dropped=dropped,
                       failed=failed, up=sorted(m for m in self.placement.members
                                                if m == self.node or is_up(m)))


def _batches(states: Mapping[str, UserState]) -> list[dict[str, UserState]]:
    """``states`` in groups of at most about BATCH_ENTRIES entries."""
    batches: list[dict[str, UserState]] = []
    current: dict[str, UserState] = {}
    size = 0
    for user, state in states.items():
        if current and size + len(state.entries) > BATCH_ENTRIES:
            batches.append(current)
            current, size = {}, 0
        current[user] = state
        size += len(state.entries) + 1
    if current:
        batches.append(current)
    return batches
