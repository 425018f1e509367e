"""The presence actor: last seen, online state, and subscriptions to both.

A user is *online* while they have a session whose last activity (any frame received from
the client) is more recent than ``threshold`` seconds; otherwise they are offline and
*last seen* at the time of that activity, or at the end of their last session.

Sessions report activity coalesced: on connect, on disconnect, and at most once every
``threshold / 4`` seconds while frames keep arriving, never once per frame. Each report
goes out on the bus to every process watching the user (this one included), and into the
``presence`` state bucket as ``[ts, session]`` (the last activity, and the session that
reported it, or "" once it ended), written at most once a second per user and kept
``last_seen_ttl`` after it, so that a process that does not follow the user answers
``lastseen`` from the bucket. The end of a session is written only if the record still
names that session, so a login elsewhere is never overwritten by the end of the session it
replaced.

Writes and subscriptions go through the mailbox. Reads (``lookup``) do not queue: they read
the actor's tables, or the buckets for a user nobody here follows. When a watched user's
state changes the actor pushes a ``presence`` frame to every local session subscribed to
them; a subscriber whose mailbox is full is disconnected as a slow consumer. A user whose
reports stop (their process died) reads as offline ``threshold`` after the last one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs
import cbor2
import trio

from chatd.actors import ActorTable, Address, Mailbox
from chatd.backends import (
    BucketSpec,
    Bus,
    PresenceReport,
    RevisionMismatch,
    State,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog
from chatd.messages import Push, offer
from chatd.protocol import Presence

__all__ = ["FLUSH_INTERVAL", "PRESENCE", "PresenceService"]

logger = logging.getLogger(__name__)

#: Each user's last activity (or the end of their last session) in ms, and the session
#: that reported it, "" once it ended: ``[ts, session]`` (CBOR).
PRESENCE = BucketSpec("presence", durable=True,
                      description="last seen: each user's last activity and session")
#: Seconds between writes of the reports collected since the last write.
FLUSH_INTERVAL = 1.0


@attrs.frozen
class _Up:
    user: str
    address: Address
    ts: int


@attrs.frozen
class _Down:
    user: str
    address: Address
    ts: int


@attrs.frozen
class _Active:
    user: str
    ts: int


@attrs.frozen
class _Watch:
    address: Address
    users: tuple[str, ...]
    add: bool
    found: tuple[tuple[str, bool, int | None], ...] = ()


@attrs.frozen
class _Heard:
    user: str
    report: PresenceReport


@attrs.frozen
class _Flush:
    done: trio.Event


_Message = _Up | _Down | _Active | _Watch | _Heard | _Flush


@attrs.define(slots=True)
class _Known:
    """What this node knows of a user it follows: online, when, and from which session."""

    online: bool
    ts: int
    session: str


class PresenceService:
    """Owns last-seen times, online state and presence subscriptions.

    Args:
        actors: The node's actor table.
        state: Where the ``presence`` bucket lives.
        bus: Where reports go to and come from.
        threshold: Seconds of inactivity after which a connected user reads as offline.
        last_seen_ttl: Seconds a user's last activity is kept.
        capacity: The presence mailbox's capacity.
    """

    def __init__(self, actors: ActorTable, state: State, bus: Bus, *,
                 threshold: float = 60.0, last_seen_ttl: float = 30 * 86400.0,
                 capacity: int = 8192) -> None:
        self._actors = actors
        self.threshold = threshold
        self.report_interval = threshold / 4
        self._bucket = state.bucket(PRESENCE)
        self._bus = bus
        self._ttl = last_seen_ttl
        self._mailbox: Mailbox[_Message] = actors.open("presence", capacity)
        self._log = EventLog(logger, actors.node, "presence")
        self._sessions: dict[str, Address] = {}
        self._known: dict[str, _Known] = {}
        self._announced: set[str] = set()
        self._watchers: dict[str, set[Address]] = {}
        self._watching: dict[Address, set[str]] = {}
        self._followed: dict[str, int] = {}  # user -> local sessions watching (bus interest)
        self._nursery: trio.Nursery | None = None
        self._dirty: dict[str, _Known] = {}  # reports of local sessions not yet written
        self._writing: dict[str, _Known] = {}  # the reports being written
        self._write_lock = trio.Lock()  # one write of the bucket at a time

    # -- reads --------------------------------------------------------------------------

    async def lookup(self, user: str) -> Presence:
        """The presence of ``user`` now, as a frame.

        Raises:
            StoreUnavailable: ``user`` is not followed here and the buckets cannot be read.
        """
        known = self._known.get(user)
        if known is None:
            return await self._read(user)
        return Presence(user, self._online(known, now_ms()), known.ts)

    async def _read(self, user: str) -> Presence:
        """A user nobody here follows, from the bucket."""
        record = await self._bucket.get(user)
        if record is None:
            return Presence(user, False, None)
        ts, session = cbor2.loads(record.value)
        return Presence(user, self._online(_Known(bool(session), ts, session), now_ms()), ts)

    def _online(self, known: _Known, now: int) -> bool:
        return known.online and now - known.ts < self.threshold * 1000

    # -- what sessions tell the actor ---------------------------------------------------

    async def session_up(self, user: str, address: Address) -> None:
        """Report that ``user`` connected with session ``address``."""
        await self._mailbox.deliver(_Up(user, address, now_ms()))

    async def session_down(self, user: str, address: Address) -> None:
        """Report that session ``address`` of ``user`` ended."""
        await self._mailbox.deliver(_Down(user, address, now_ms()))

    def active(self, user: str) -> bool:
        """Report activity of ``user`` without waiting; False if the mailbox is full."""
        return self._mailbox.deliver_nowait(_Active(user, now_ms()))

    async def watch(self, address: Address, users: tuple[str, ...], *, add: bool) -> None:
        """Subscribe (``add``) or unsubscribe session ``address`` to ``users``.

        Subscribing follows each user not yet followed here on the bus first, then reads
        what the buckets know of them, in the caller's task, so the actor never waits.

        Raises:
            StoreUnavailable: The bus or the buckets cannot be reached (nothing changed).
        """
        found: list[tuple[str, bool, int | None]] = []
        if add:
            followed: list[str] = []
            try:
                for user in users:
                    self._followed[user] = self._followed.get(user, 0) + 1
                    followed.append(user)
                    if self._followed[user] == 1:
                        await self._bus.watch(user)
                for user in users:
                    if user not in self._known:
                        presence = await self._read(user)
                        found.append((user, presence.online, presence.last_seen))
            except BaseException:
                self._unfollow(followed)
                raise
        await self._mailbox.deliver(_Watch(address, users, add, tuple(found)))

    async def flush(self) -> None:
        """Write every report received so far (the node calls this as it shuts down)."""
        done = trio.Event()
        await self._mailbox.deliver(_Flush(done))
        await done.wait()

    def heard(self, user: str, report: PresenceReport) -> None:
        """A report about ``user`` arrived on the bus (from any process, this one too)."""
        self._mailbox.deliver_nowait(_Heard(user, report))

    # -- the actor ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[PresenceService] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """The actor loop: apply reports, write them out, sweep for users gone idle."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            next_sweep = trio.current_time() + self.report_interval
            next_flush = trio.current_time() + FLUSH_INTERVAL
            while True:
                with trio.move_on_at(min(next_sweep, next_flush)):
                    self._handle(await self._mailbox.receive())
                    continue
                now = trio.current_time()
                if now >= next_flush:
                    next_flush = now + FLUSH_INTERVAL
                    if self._dirty and not self._write_lock.locked():
                        nursery.start_soon(self._flush, self._dirty)
                        self._dirty = {}
                if now >= next_sweep:
                    next_sweep = now + self.report_interval
                    self._sweep()

    async def _flush_all(self, done: trio.Event) -> None:
        """Write what is left, after the write under way."""
        dirty, self._dirty = self._dirty, {}
        await self._flush(dirty)
        done.set()

    async def _flush(self, dirty: dict[str, _Known]) -> None:
        """Write the latest report of each user reported since the last write.

        The end of a session is written only if the record still names that session.
        """
        async with self._write_lock:
            await self._write(dirty)

    async def _write(self, dirty: dict[str, _Known]) -> None:
        self._writing = dirty
        try:
            await self._bucket.put_many(
                [(user, cbor2.dumps([known.ts, known.session]))
                 for user, known in dirty.items() if known.online], ttl=self._ttl)
            for user, known in dirty.items():
                if known.online:
                    continue
                value = cbor2.dumps([known.ts, ""])
                record = await self._bucket.get(user)
                try:
                    if record is None:
                        await self._bucket.create(user, value, ttl=self._ttl)
                    elif cbor2.loads(record.value)[1] in (known.session, ""):
                        await self._bucket.update(user, value, record.revision, ttl=self._ttl)
                except RevisionMismatch:
                    pass  # a newer login wrote it meanwhile
        except StoreUnavailable:
            self._log.warning("last_seen_not_written", users=len(dirty))
            for user, known in dirty.items():  # try again with the next write
                self._dirty.setdefault(user, known)
        finally:
            self._writing = {}
            for user in dirty:
                self._prune(user)

    def _prune(self, user: str) -> None:
        """Forget a user this node no longer follows, nor has a report of to write."""
        if (user not in self._sessions and user not in self._followed
                and user not in self._dirty and user not in self._writing):
            self._known.pop(user, None)
            self._announced.discard(user)

    def _handle(self, message: _Message) -> None:
        match message:
            case _Up(user, address, ts):
                self._sessions[user] = address
                self._report(user, True, ts, address)
            case _Down(user, address, ts):
                if self._sessions.get(user) == address:
                    del self._sessions[user]
                    self._report(user, False, ts, address)
                    self._prune(user)
                unwatched = self._watching.pop(address, ())
                for watched in unwatched:
                    watchers = self._watchers.get(watched)
                    if watchers is not None:
                        watchers.discard(address)
                        if not watchers:
                            del self._watchers[watched]
                self._unfollow(unwatched)
            case _Active(user, ts):
                current = self._sessions.get(user)
                if current is not None:
                    self._report(user, True, ts, current)
            case _Watch(address, users, add, found):
                for user, online, seen in found:
                    if user not in self._known and seen is not None:
                        self._known[user] = _Known(online, seen, "")
                self._watch(address, users, add)
            case _Heard(user, report):
                self._heard(user, report)
            case _Flush(done):
                assert self._nursery is not None
                self._nursery.start_soon(self._flush_all, done)

    def _report(self, user: str, online: bool, ts: int, address: Address) -> None:
        """A local session's report: apply it, queue it for the bucket, tell the bus."""
        report = PresenceReport(online, ts, f"{address.node}.{address.serial}")
        self._heard(user, report, local=True)
        self._dirty[user] = _Known(online, ts, report.session)
        self._bus.report(user, report)

    def _heard(self, user: str, report: PresenceReport, *, local: bool = False) -> None:
        """Apply a report about a user this node follows, and announce a change."""
        if not local and user not in self._known and user not in self._followed:
            return
        known = self._known.get(user)
        if known is not None:
            if report.online and report.ts < known.ts and known.session != report.session:
                return  # a late report of a session replaced since
            if not report.online and known.online and known.session not in (
                    report.session, ""):
                return  # the end of a session replaced since
        ts = max(report.ts, known.ts) if known is not None else report.ts
        self._known[user] = _Known(report.online, ts, report.session)
        self._announce(user, now_ms())

    def _unfollow(self, users: Iterable[str]) -> None:
        for user in users:
            count = self._followed.get(user, 0) - 1
            if count > 0:
                self._followed[user] = count
                continue
            self._followed.pop(user, None)
            self._bus.unwatch(user)
            self._prune(user)

    def _watch(self, address: Address, users: tuple[str, ...], add: bool) -> None:
        watching = self._watching.setdefault(address, set())
        for user in users:
            if add:
                watching.add(user)
                self._watchers.setdefault(user, set()).add(address)
            else:
                watching.discard(user)
                watchers = self._watchers.get(user)
                if watchers is not None:
                    watchers.discard(address)
                    if not watchers:
                        del self._watchers[user]
        if not watching:
            del self._watching[address]
        if add:
            now = now_ms()
            for user in users:
                known = self._known.get(user)
                if known is not None and self._online(known, now):
                    self._announced.add(user)
            self._push(address, tuple(self._frame(user, now) for user in users))
        else:
            self._unfollow(users)

    def _frame(self, user: str, now: int) -> Presence:
        """The frame a subscription sends: marked ``watch`` (version 2 clients see it)."""
        known = self._known.get(user)
        if known is None:
            return Presence(user, False, None, watch=True)
        return Presence(user, self._online(known, now), known.ts, watch=True)

    def _announce(self, user: str, now: int) -> None:
        known = self._known.get(user)
        online = known is not None and self._online(known, now)
        if online == (user in self._announced):
            return
        if online:
            self._announced.add(user)
        else:
            self._announced.discard(user)
        frame = (self._frame(user, now),)
        for address in tuple(self._watchers.get(user, ())):
            self._push(address, frame)

    def _push(self, address: Address, frames: tuple[Presence, ...]) -> None:
        mailbox = self._actors.lookup(address)
        if mailbox is not None:
            offer(mailbox, Push(frames), self._log, session=str(address))

    def _sweep(self) -> None:
        now = now_ms()
        for user in tuple(self._announced):
            known = self._known.get(user)
            if known is None or not self._online(known, now):
                self._announce(user, now)
