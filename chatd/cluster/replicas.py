"""The cluster's store: every user's queue on two nodes, led by one of them.

:class:`Replicas` implements :class:`chatd.store.Store` for the router and sessions of a
node in a cluster, on top of the node's own store (one replica among others). Placement
(:mod:`chatd.cluster.placement`) names, for each user, the two reachable nodes that keep
the queue; the first *leads* it:

- A message for bob goes to bob's leader (a ``put`` request over the link, unless this
  node leads). The leader checks the id, numbers the message, and writes it to its own
  store and to the other replica (``rep``) at the same time; ``sent`` is answered when
  both have it on disk. An acknowledgement goes the same way (``ack`` / ``ackrep``); the
  receipts it produces go to each sender's leader (``rcpt``).
- A session catching up asks both replicas (``pend``) and merges what they hold.
- When a node goes down, placement moves on: the next member of the ranking becomes a
  replica (a hinted one) and the other owner leads. Requests in flight to the dead node
  fail over to the new leader with the same message id, which the replicas recognise.
- After every membership change, each node hands its queues to their leaders: a node
  that holds a queue it does not lead sends it to the leader (``merge``), a leader asks
  its follower for the follower's copy (``pull``); the leader merges
  (:func:`chatd.cluster.merge.merge_states`) and sets both replicas to the result
  (``set``). A node that is no longer a replica of a queue then forgets it: this is how
  hinted data moves back to its owner (:mod:`chatd.cluster.handoff`).

Requests are link frames ``{"t": "q", "id", "op", ...}`` answered by ``{"t": "r", "id",
...}``; a request to a peer that goes down fails at once, one that gets no answer within
the request timeout fails too, and the caller tries the new placement.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.store import (
    Accepted,
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    ReplicaStore,
    StoreUnavailable,
)

from .calls import Calls, PeerGone, Refused, Send
from .gates import QueueGates
from .handoff import Handoff
from .merge import pack_entry, pack_state, unpack_entry, unpack_state
from .placement import Placement

__all__ = ["Replicas"]

logger = logging.getLogger(__name__)

#: Requests that only read or write this node's own store.
_LOCAL_OPS = frozenset(("rep", "ackrep", "pend", "pull", "set"))
#: How many times a request is tried, under the placement of the moment, before it fails.
ATTEMPTS = 6
#: Seconds that, doubled, make the first pause between tries; each later pause doubles
#: again (0.1, 0.2, 0.4, 0.8, 1.6: 3.1 s in all).
RETRY_PAUSE = 0.05


class _Moved(Exception):
    """A replica does not take a change from a node it does not see as the leader.

    ``via`` is the replica that refused, when the request can be passed on to it (it
    passes it to the leader it sees).
    """

    def __init__(self, user: str, via: str | None = None) -> None:
        super().__init__(user)
        self.via = via


class Replicas:
    """The :class:`chatd.store.Store` of a node in a cluster.

    Args:
        node: This node's name.
        members: Every member of the cluster.
        local: This node's own store.
        send: Sends a frame on the link to a peer.
        is_up: Whether a peer is reachable now.
        timeout: Seconds a request may wait for its answer.
        settle: Seconds a node waits for its peers when it starts before it serves.
    """

    waits_for_io = True

    def __init__(self, node: str, members: Sequence[str], local: ReplicaStore, send: Send,
                 is_up: Callable[[str], bool], *, timeout: float, settle: float) -> None:
        self.node = node
        self.local = local
        self.placement = Placement(node, members, is_up)
        self._send = send
        self._is_up = is_up
        self._settle = settle
        self._calls = Calls(send, is_up, timeout)
        #: Copies a change needs: two, or one in a cluster configured with no peers.
        self._copies = min(2, len(self.placement.members))
        self._inflight: dict[tuple[str, str], trio.Event] = {}
        self._gates = QueueGates()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._log = EventLog(logger, node, "replicas")
        #: Offers a stored entry to the user's session, wherever it is (set by the node).
        self.offer: Callable[[str, Entry], None] = lambda user, entry: None
        #: Whether the registry knows a session of the user (set by the node).
        self.locate: Callable[[str], bool] = lambda user: False
        self._handoff = Handoff(node, local, self.placement, self._call, self._gates,
                                lambda user, entry: self.offer(user, entry), self._log)

    # -- the actor -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Replicas] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Wait for the peers (up to ``settle``), hand queues over, then serve requests."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            peers = [m for m in self.placement.members if m != self.node]
            with trio.move_on_after(self._settle):
                while not all(self._is_up(p) for p in peers):
                    await self._wait_changed()
            await self._handoff.run(self._is_up)
            task_status.started(self)
            while True:
                await self._wait_changed()
                await self._handoff.run(self._is_up)

    async def _wait_changed(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    def peer_changed(self, peer: str, up: bool) -> None:
        """Membership changed: fail requests to a peer that went down, hand over queues."""
        if not up:
            self._calls.peer_down(peer)
        self._changed.set()

    # -- the Store interface -------------------------------------------------------------

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message`` on both replicas of its recipient; see :meth:`Store.submit`."""
        reply, here = await self._lead("put", message.to, {"msg": list(message)},
                                       lambda: self._lead_submit(message))
        entry = reply.get("entry")
        # A remote leader offered the entry itself; one led here is the router's to offer.
        return Accepted(int(reply["ts"]), bool(reply["dup"]),
                        unpack_entry(message.to, entry) if entry and here else None)

    async def submit_many(self, messages: Sequence[Message]) -> list[Accepted | Exception]:
        """Queue a run of one sender's messages, in order; see :meth:`submit`.

        The messages are grouped by the leader of their recipient's queue: one request per
        leader and one write per queue on each replica, so a session's run of sends costs
        one round trip instead of one each. A message whose group cannot be written that
        way (its leader went away, or saw the message's id in flight) is submitted alone,
        with :meth:`submit`'s retries.

        Returns:
            For each message, its :class:`Accepted` or what it failed with
            (:class:`IdConflict` or :class:`StoreUnavailable`).
        """
        results: list[Accepted | Exception | None] = [None] * len(messages)
        groups: dict[str, list[int]] = {}
        for at, message in enumerate(messages):
            replicas = self.placement.replicas(message.to)
            leader = replicas[0] if len(replicas) >= self._copies else ""
            groups.setdefault(leader, []).append(at)

        async def one(at: int) -> None:
            try:
                results[at] = await self.submit(messages[at])
            except (IdConflict, StoreUnavailable) as err:
                results[at] = err

        async def group(leader: str, indexes: list[int]) -> None:
            batch = [messages[at] for at in indexes]
            answers: list[dict[str, Any]] = [{"err": "retry"}] * len(batch)
            here = leader == self.node
            with contextlib.suppress(PeerGone, Refused, _Moved, StoreUnavailable):
                if here:
                    answers = await self._lead_many(batch)
                elif leader:
                    reply = await self._call(leader, {"op": "putm", "user": batch[0].to,
                                                      "msgs": [list(m) for m in batch]})
                    answers = reply["results"]
            for at, answer in zip(indexes, answers, strict=True):
                if answer.get("err") == "retry":
                    await one(at)
                elif answer.get("err") == "id_conflict":
                    results[at] = IdConflict(messages[at].id)
                elif "err" in answer:
                    results[at] = StoreUnavailable(str(answer["err"]))
                else:
                    entry = answer.get("entry")
                    results[at] = Accepted(int(answer["ts"]), bool(answer["dup"]),
                                           unpack_entry(messages[at].to, entry)
                                           if entry and here else None)

        async with trio.open_nursery() as nursery:
            for leader, indexes in groups.items():
                nursery.start_soon(group, leader, indexes)
        return [result if result is not None else StoreUnavailable("not written")
                for result in results]

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Acknowledge on both replicas, then queue the receipts with their senders."""
        reply, _ = await self._lead("ack", user, {"status": status, "upto": upto,
                                                  "peer": peer},
                                    lambda: self._lead_ack(user, status, upto, peer))
        receipts: dict[str, list[ReceiptItem]] = {}
        for sender, status_, by, ids, ts in reply["receipts"]:
            receipts.setdefault(sender, []).append(ReceiptItem(status_, by, tuple(ids), ts))
        queued: list[tuple[str, Entry]] = []
        for sender, items in receipts.items():
            packed = [[i.status, i.by, list(i.ids), i.ts] for i in items]
            try:
                answer, here = await self._lead(
                    "rcpt", sender, {"items": packed},
                    functools.partial(self._lead_receipts, sender, items))
            except StoreUnavailable:
                self._log.warning("receipts_not_queued", user=sender, receipts=len(items))
                continue
            if here:
                queued.extend((sender, unpack_entry(sender, e)) for e in answer["entries"])
        return queued

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` entries after ``after``, merged from both replicas."""
        _, entries = await self._read(user, after, limit)
        return entries

    async def last_seq(self, user: str) -> int:
        """The highest sequence number either replica gave an item of ``user``."""
        last, _ = await self._read(user, 0, 0)
        return last

    async def _read(self, user: str, after: int, limit: int) -> tuple[int, list[Entry]]:
        replies: list[dict[str, Any]] = []

        async def ask(node: str) -> None:
            with contextlib.suppress(PeerGone, Refused):
                replies.append(await self._ask(node, "pend", {"user": user, "after": after,
                                                              "limit": limit}))

        async with trio.open_nursery() as nursery:
            for node in self.placement.replicas(user):
                nursery.start_soon(ask, node)
        if not replies:
            raise StoreUnavailable(f"no replica of {user}'s queue is reachable")
        acked = max(int(r["acked"]) for r in replies)
        floor = max(after, acked)
        entries: dict[int, Entry] = {}
        for reply in replies:
            for fields in reply["entries"]:
                entry = unpack_entry(user, fields)
                if entry.seq > floor:
                    entries.setdefault(entry.seq, entry)
        last = max(int(r["last"]) for r in replies)
        return last, [entries[seq] for seq in sorted(entries)[:limit]]

    # -- requests ------------------------------------------------------------------------

    async def _lead(self, op: str, user: str, fields: dict[str, Any],
                    here: Callable[[], Awaitable[dict[str, Any]]]
                    ) -> tuple[dict[str, Any], bool]:
        """Run ``op`` for ``user`` on its leader: here, or on a peer, trying again (after
        a short, growing pause) while placement settles after a node went away.

        Returns:
            The answer, and whether the operation was led here.

        Raises:
            IdConflict: The leader found the message id used for another recipient.
            StoreUnavailable: No leader could make the change durable on two replicas.
        """
        via: str | None = None
        for attempt in range(ATTEMPTS):
            if attempt and via is None:
                await trio.sleep(RETRY_PAUSE * 2 ** attempt)
            replicas = self.placement.replicas(user)
            if len(replicas) < self._copies:
                continue
            target, via = via or replicas[0], None
            try:
                if target == self.node:
                    return await here(), True
                return await self._call(target, {"op": op, "user": user, **fields}), False
            except _Moved as moved:
                via = moved.via
                continue
            except PeerGone:
                continue
            except Refused as refused:
                if refused.code == "id_conflict":
                    raise IdConflict(user) from None
                if refused.code != "moved":
                    break
        raise StoreUnavailable(f"{user}'s queue cannot be written on two replicas now")

    async def _ask(self, node: str, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Run a replica operation here or on ``node``."""
        if node == self.node:
            return await self._serve(op, fields)
        return await self._call(node, {"op": op, **fields})

    async def _call(self, peer: str, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._calls.call(peer, frame)

    async def remote(self, peer: str, frame: dict[str, Any]) -> None:
        """A request or an answer from ``peer``.

        A request that only touches this node's store is served at once, in the link's
        task, when the store does not wait for I/O (the memory store): a task of its own
        would cost more than the work. Any other request gets a task, so that the link
        goes on reading (a leader's request waits for answers that may come on it).
        """
        if frame["t"] == "r":
            self._calls.answered(peer, frame)
        elif frame.get("op") in _LOCAL_OPS and not self.local.waits_for_io:
            await self._answer(peer, frame)
        elif self._nursery is not None:
            self._nursery.start_soon(self._answer, peer, frame)

    async def _answer(self, peer: str, frame: dict[str, Any]) -> None:
        try:
            reply = await self._serve(str(frame["op"]), frame)
        except IdConflict:
            reply = {"err": "id_conflict"}
        except StoreUnavailable:
            reply = {"err": "unavailable"}
        except (PeerGone, _Moved):
            reply = {"err": "moved"}
        except (KeyError, TypeError, ValueError) as err:
            self._log.warning("link_frame_refused", peer=peer, op=str(frame.get("op")),
                              reason=repr(err))
            reply = {"err": "bad_request"}
        self._send(peer, {"t": "r", "id": frame.get("id"), **reply})

    async def _serve(self, op: str, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out one request (from a peer, or from this node for itself)."""
        if op in ("put", "ack", "rcpt"):
            return await self._serve_leading(op, frame)
        if op == "putm":  # the requester chose this node as every recipient's leader
            messages = [Message(*fields) for fields in frame["msgs"]]
            if any(self.placement.replicas(m.to)[:1] != [self.node] for m in messages):
                raise _Moved("")
            return {"results": await self._lead_many(messages, offer=True)}
        local = self.local
        user = str(frame.get("user", ""))
        match op:
            case "rep":
                self._check_leader(user, frame)
                entries = [unpack_entry(user, e) for e in frame["entries"]]
                await local.put(user, entries)
                if not frame.get("known", True) and self.locate(user):
                    # The leader cannot see the user's session (a cut link), this node
                    # can: the entries reach the session through here.
                    for entry in entries:
                        self.offer(user, entry)
                return {}
            case "ackrep":
                self._check_leader(user, frame)
                await local.acknowledge_only(user, str(frame["status"]), int(frame["upto"]),
                                             frame["peer"])
                return {}
            case "pend":
                index = local.index
                found = index.pending(user, int(frame["after"]), int(frame["limit"]))
                return {"acked": index.acked(user), "last": index.last_seq(user),
                        "entries": [pack_entry(e) for e in found]}
            case "merge":
                states = {str(u): unpack_state(str(u), s) for u, s in frame["states"].items()}
                await self._handoff.merge(states)
                return {}
            case "pull":
                users = [str(u) for u in frame["users"]]
                exported = local.index.export(users)
                return {"states": {u: pack_state(s) for u, s in exported.items()}}
            case "set":
                states = {str(u): unpack_state(str(u), s) for u, s in frame["states"].items()}
                await local.replace(states)
                return {}
        raise ValueError(f"unknown operation {op!r}")

    async def _serve_leading(self, op: str, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out a request for a queue's leader, or pass it on to the leader.

        A request is passed on at most twice: to the leader this node sees, or to the
        replica that refused this node's lead (which passes it to the leader it sees).
        """
        user = str(frame["user"])
        hops = int(frame.get("hops", 0))
        replicas = self.placement.replicas(user)
        if not replicas:
            raise StoreUnavailable(user)
        via = replicas[0] if replicas[0] != self.node else None
        if via is None:
            try:
                match op:
                    case "put":
                        return await self._lead_submit(Message(*frame["msg"]), offer=True)
                    case "ack":
                        return await self._lead_ack(user, str(frame["status"]),
                                                    int(frame["upto"]), frame["peer"])
                    case _:
                        items = [ReceiptItem(str(s), str(b), tuple(ids), int(ts))
                                 for s, b, ids, ts in frame["items"]]
                        return await self._lead_receipts(user, items, offer=True)
            except _Moved as moved:
                if moved.via is None:
                    raise
                via = moved.via
        if hops >= 2:
            raise _Moved(user)
        fields = {k: v for k, v in frame.items() if k not in ("t", "id")}
        return await self._call(via, {**fields, "hops": hops + 1})

    def _check_leader(self, user: str, frame: Mapping[str, Any]) -> None:
        """Refuse a change from a node this one does not see as the leader of ``user``.

        Two nodes that cannot see each other may both think they lead a queue; a replica
        that sees both takes changes from one only, so that it never holds two different
        items under one number (the other's write fails over, or is refused).

        Raises:
            _Moved: The sender is not the leader from here.
        """
        if self.placement.replicas(user)[:1] != [frame.get("from")]:
            raise _Moved(user)

    # -- what a leader does --------------------------------------------------------------

    async def _both(self, user: str, here: Callable[[], Awaitable[object]],
                    frame: dict[str, Any]) -> None:
        """Run a change here and on the other replica of ``user`` at the same time.

        Raises:
            StoreUnavailable: Either copy could not be made.
            _Moved: The other replica sees another node as the leader (the caller
                passes the request on to it).
        """
        if not self.local.waits_for_io:  # nothing to overlap: no task, no nursery
            await here()
            moved = await self._replicate(user, frame)
            if moved is not None:
                raise _Moved(user, via=moved)
            return
        failure: StoreUnavailable | None = None

        async def locally() -> None:
            nonlocal failure
            try:
                await here()
            except StoreUnavailable as err:
                failure = err

        async with trio.open_nursery() as nursery:
            nursery.start_soon(locally)
            moved = await self._replicate(user, frame)
        if failure is not None:
            raise failure
        if moved is not None:
            raise _Moved(user, via=moved)

    async def _replicate(self, user: str, frame: dict[str, Any]) -> str | None:
        """Make a change on the other replica of ``user``, trying the next one if it fails.

        Returns:
            None, or the replica that refused because it sees another leader.

        Raises:
            StoreUnavailable: There is no other replica, or none took the change.
        """
        if self._copies == 1:
            return None  # a cluster of one: its own store is the only copy
        for _ in range(ATTEMPTS):
            replicas = self.placement.replicas(user)
            if len(replicas) < 2 or replicas[0] != self.node:
                break
            try:
                await self._call(replicas[1], {**frame, "user": user, "from": self.node,
                                               "known": self.locate(user)})
            except Refused as refused:
                if refused.code == "moved":
                    return replicas[1]
                await trio.sleep(RETRY_PAUSE)
                continue
            except PeerGone:
                await trio.sleep(RETRY_PAUSE)
                continue
            return None
        raise StoreUnavailable(f"{user}'s queue has no second replica now")

    async def _lead_submit(self, message: Message, *, offer: bool = False) -> dict[str, Any]:
        user, key = message.to, (message.sender, message.id)
        index = self.local.index
        async with self._gates.writing(user):
            while True:
                seen = index.seen(message, now_ms())
                if seen is not None:
                    return {"ts": seen[1], "dup": True}
                inflight = self._inflight.get(key)
                if inflight is None:
                    break
                await inflight.wait()
            done = self._inflight[key] = trio.Event()
            try:
                entry = Entry(index.reserve(user), message)
                await self._both(user, lambda: self.local.put(user, [entry]),
                                 {"op": "rep", "entries": [pack_entry(entry)]})
            finally:
                del self._inflight[key]
                done.set()
        if offer:
            self.offer(user, entry)
        return {"ts": message.ts, "dup": False, "entry": pack_entry(entry)}

    async def _lead_many(self, messages: Sequence[Message], *, offer: bool = False
                         ) -> list[dict[str, Any]]:
        """Number a run of messages in order and write each queue's share once.

        Returns:
            An answer per message, as :meth:`_lead_submit` gives, or ``{"err": "retry"}``
            for one to submit alone (its id is being written by another request, or its
            queue's second copy failed).
        """
        index = self.local.index
        answers: list[dict[str, Any]] = [{"err": "retry"}] * len(messages)
        async with contextlib.AsyncExitStack() as stack:
            for user in dict.fromkeys(m.to for m in messages):
                await stack.enter_async_context(self._gates.writing(user))
            # Nothing awaits from here until every message has its number: they follow
            # the order of the run.
            fresh: dict[str, list[tuple[int, Entry]]] = {}
            marked: list[tuple[tuple[str, str], trio.Event]] = []
            now = now_ms()
            for at, message in enumerate(messages):
                key = (message.sender, message.id)
                try:
                    seen = index.seen(message, now)
                except IdConflict:
                    answers[at] = {"err": "id_conflict"}
                    continue
                if seen is not None:
                    answers[at] = {"ts": seen[1], "dup": True}
                elif key not in self._inflight:
                    event = self._inflight[key] = trio.Event()
                    marked.append((key, event))
                    fresh.setdefault(message.to, []).append(
                        (at, Entry(index.reserve(message.to), message)))

            async def commit(user: str, numbered: list[tuple[int, Entry]]) -> None:
                entries = [entry for _, entry in numbered]
                with contextlib.suppress(StoreUnavailable, _Moved):
                    await self._both(user, lambda: self.local.put(user, entries),
                                     {"op": "rep", "entries": [pack_entry(e) for e in entries]})
                    for at, entry in numbered:
                        answers[at] = {"ts": entry.item.ts, "dup": False,
                                       "entry": pack_entry(entry)}
                        if offer:
                            self.offer(user, entry)

            try:
                async with trio.open_nursery() as nursery:
                    for user, numbered in fresh.items():
                        nursery.start_soon(commit, user, numbered)
            finally:
                for key, event in marked:
                    del self._inflight[key]
                    event.set()
        return answers

    async def _lead_ack(self, user: str, status: str, upto: int, peer: str | None
                        ) -> dict[str, Any]:
        receipts: list[tuple[str, ReceiptItem]] = []

        async def here() -> None:
            receipts.extend(await self.local.acknowledge_only(user, status, upto, peer))

        async with self._gates.writing(user):
            await self._both(user, here, {"op": "ackrep", "status": status, "upto": upto,
                                          "peer": peer})
        return {"receipts": [[sender, *item[:2], list(item.ids), item.ts]
                             for sender, item in receipts]}

    async def _lead_receipts(self, user: str, items: Sequence[ReceiptItem], *,
                             offer: bool = False) -> dict[str, Any]:
        index = self.local.index
        async with self._gates.writing(user):
            entries = [Entry(index.reserve(user), item) for item in items]
            await self._both(user, lambda: self.local.put(user, entries),
                             {"op": "rep", "entries": [pack_entry(e) for e in entries]})
        if offer:
            for entry in entries:
                self.offer(user, entry)
        return {"entries": [pack_entry(e) for e in entries]}

