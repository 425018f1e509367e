"""Queues on NATS JetStream: one stream, a subject per queue, no consumer per user.

Every queue item is a message on ``NS.q.USER`` in the stream ``NS_queues``, and its
sequence number is the stream's: numbers only grow, a queue's numbers have gaps (other
queues share the sequence), and the stream republishes every stored item to
``NS.d.USER`` with the sequence of the item before it in the same queue, which is how a
session tells the next item from a gap (:class:`chatd.messages.Deliver`).

- **Append**: a publish with ``Nats-Msg-Id: SENDER ID``; ``sent`` only after JetStream's
  acknowledgement (a quorum of replicas has it). A duplicate within the stream's dedup
  window is answered with the original's sequence: the original, or once it has left its
  queue, its *ids record* (below), tells its recipient and ``ts``.
- **Read**: a batched direct get by subject, from a sequence number.
- **Acknowledge**: one *acknowledgement record* on ``NS.a.USER`` carries the new watermark,
  the messages that left the queue, the receipts it produces and the unread memory's change
  (or, every so often and whenever it is small, all of it, as a rollup that replaces the
  user's older records). It is published with ``Nats-Expected-Last-Subject-Sequence``, so
  two sessions acknowledging at once (during a takeover) cannot both write. The record is
  the change, and it is durable before the acknowledgement returns; then its receipts are
  published to their senders' queues (``Nats-Msg-Id`` derived from the record, so whoever
  opens the queue next, after a crash on any node, publishes the newest record's receipts
  again and nothing a record promised is lost or doubled).
- **Clean-up**: items at or below the watermark are skipped by every read, and removed in
  batches (every :data:`CLEAN_BATCH` acknowledged items, each second, and when the queue is
  opened): first the ids of the messages among them are written to
  ``NS.i.SENDER.USER`` (kept for the dedup window with ``Nats-TTL``), then the queue is
  purged up to the last of them, so a message never leaves its queue before its id record
  exists.

A node keeps the watermark and unread memory of the users whose sessions it holds
(:meth:`NatsQueues.open` loads them from the records), serializes their acknowledgements,
and remembers the items it has seen of their queues (read, or brought by the bus), so that
an acknowledgement of what the session was sent needs no read.

The acknowledgement records are written, replayed and carried out here together (a little
over 500 lines), so that their format and their meaning are stated in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cbor2
import trio

from chatd.backends._acks import Unread, apply_ack, plan_receipts
from chatd.backends._records import (
    Accepted,
    Entry,
    IdConflict,
    Message,
    ReceiptItem,
    StoreUnavailable,
)
from chatd.clock import now_ms
from chatd.logs import EventLog

from ._jetstream import WRONG_LAST_SEQUENCE, JetStream, JetStreamError, PublishStats, header_int
from ._names import Names, decode_item, encode_item

__all__ = ["ACK_CHUNK", "NatsQueues"]

logger = logging.getLogger(__name__)

#: Most queue items one acknowledgement record covers (a larger acknowledgement is
#: recorded in steps, each a consistent state).
ACK_CHUNK = 512
#: A record holds the whole unread memory (and replaces the older records) when it has at
#: most this many messages, or after this many records that did not.
SNAPSHOT_UNREAD = 256
MAX_DELTAS = 32
#: Records and ids records read per direct get.
_PAGE = 256
#: Acknowledged items a queue may hold before they are cleaned up at once.
CLEAN_BATCH = 256
#: Items of a queue remembered for acknowledgements without a read.
SEEN_MAX = 4096
#: Ids records of one sender and recipient searched for a duplicate's original.
_IDS_RECORDS = 64
#: Attempts at an acknowledgement that finds another node's record in its way.
_CAS_ATTEMPTS = 4
#: Seconds between retries of an outbox that failed.
RETRY_INTERVAL = 1.0


class _UserQueue:
    """What this node keeps of a queue whose session it holds."""

    __slots__ = ("acked", "deltas", "known", "lock", "outbox", "record", "refs", "seen",
                 "unclean", "unread")

    def __init__(self) -> None:
        self.refs = 0
        self.acked = 0  # every item up to here has been acknowledged
        self.unread = Unread()
        self.record = 0  # the sequence of the newest acknowledgement record, 0 if none
        self.deltas = 0  # records since the last one holding the whole unread memory
        self.outbox: tuple[int, dict[str, Any]] | None = None  # receipts to publish
        self.unclean = 0  # acknowledged items not yet cleaned up (an estimate)
        self.known = 0  # the highest seq of the queue this node has seen
        # Items seen: seq -> (the seq before it in the queue, kind, sender or by, id, ts).
        self.seen: dict[int, tuple[int, str, str, str, int]] = {}
        self.lock = trio.Lock()

    def idle(self) -> bool:
        """Whether nothing is left to carry out or to clean up."""
        return self.outbox is None and self.unclean == 0

    def note(self, entry: Entry, prev: int) -> None:
        """Remember an item (and that nothing lies between ``prev`` and it)."""
        self.known = max(self.known, entry.seq)
        if entry.seq <= self.acked:
            return
        item = entry.item
        if isinstance(item, Message):
            self.seen[entry.seq] = (prev, "m", item.sender, item.id, item.ts)
        else:
            self.seen[entry.seq] = (prev, "r", item.by, "", item.ts)
        while len(self.seen) > SEEN_MAX:
            del self.seen[next(iter(self.seen))]

    def covered(self, upto: int) -> list[tuple[int, str, str, str, int]] | None:
        """Every item above the watermark up to ``upto``, if the ones seen link up to it
        (``(seq, kind, sender, id, ts)`` in seq order); None if they do not."""
        chain = []
        seq = upto
        while seq > self.acked:
            hit = self.seen.get(seq)
            if hit is None:
                return None
            prev, kind, sender, msg_id, ts = hit
            chain.append((seq, kind, sender, msg_id, ts))
            seq = prev
        chain.reverse()
        return chain

    def forget_seen(self) -> None:
        """Drop the items at or below the watermark."""
        for seq in [seq for seq in self.seen if seq <= self.acked]:
            del self.seen[seq]


class NatsQueues:
    """The queues interface on JetStream (see :class:`chatd.backends.Queues`).

    Args:
        jetstream: The JetStream API over the node's NATS connection.
        names: Subjects and streams.
        dedup_window: Seconds message ids are remembered (the stream's duplicate window,
            and how long ids records are kept).
        max_unread: Most delivered-but-unread messages remembered per user.
        log: Where failures are logged.
    """

    waits_for_io = True

    def __init__(self, jetstream: JetStream, names: Names, *, dedup_window: float,
                 max_unread: int, log: EventLog) -> None:
        self._js = jetstream
        self._names = names
        self._window = dedup_window
        self._max_unread = max_unread
        self._log = log
        self._users: dict[str, _UserQueue] = {}
        #: The publishes of messages (the writes behind ``sent``): latency and failures.
        self.publishes = PublishStats()

    # -- sessions ------------------------------------------------------------------------

    async def open(self, user: str) -> None:
        """Load ``user``'s watermark and unread memory; see :meth:`Queues.open`."""
        queue = self._users.get(user)
        if queue is None:
            queue = self._users[user] = _UserQueue()
        queue.refs += 1
        if queue.refs > 1:
            return
        try:
            async with queue.lock:
                await self._load(user, queue)
                await self._carry_out(user, queue)
                await self._clean(user, queue)
                # The newest item, from the leader: a read that a replica behind answers
                # short of it is completed from the leader (pending()).
                newest = await self._js.get_from_leader(self._names.stream,
                                                        last_by_subj=self._names.queue(user))
                if newest is not None:
                    queue.known = max(queue.known, newest[1])
        except BaseException:
            self.close(user)
            raise

    def close(self, user: str) -> None:
        """Forget ``user``'s queue once its last local session is gone."""
        queue = self._users.get(user)
        if queue is not None:
            queue.refs -= 1
            if queue.refs <= 0 and queue.idle():
                del self._users[user]

    # -- appending ---------------------------------------------------------------------

    async def submit(self, message: Message) -> Accepted:
        """Queue ``message``; see :meth:`chatd.backends.Queues.submit`."""
        outcome = (await self.submit_many([message]))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def submit_many(self, messages: Sequence[Message]) -> list[Accepted | Exception]:
        """Publish a run of messages at once; see :meth:`Queues.submit_many`."""
        names = self._names
        try:
            getters = self._js.publish_all([
                (names.queue(m.to), encode_item(m), {"Nats-Msg-Id": f"{m.sender} {m.id}"})
                for m in messages], stats=self.publishes)
        except StoreUnavailable as exc:  # no connection to NATS: none was sent
            return [exc] * len(messages)
        results: list[Accepted | Exception] = []
        for message, get in zip(messages, getters, strict=True):
            try:
                ack = await get()
            except (StoreUnavailable, JetStreamError) as exc:
                results.append(StoreUnavailable(str(exc)))
                continue
            if not ack.duplicate:
                results.append(Accepted(message.ts, False, Entry(ack.seq, message)))
                continue
            try:
                results.append(await self._original(message, ack.seq))
            except (IdConflict, StoreUnavailable) as exc:
                results.append(exc)
        return results

    async def _original(self, message: Message, seq: int) -> Accepted:
        """The answer to a duplicate of the message stored at ``seq``.

        Read from the stream's leader: a replica that is behind would not have it yet and
        make it look gone.

        Raises:
            IdConflict: The original went to another recipient.
        """
        js, names = self._js, self._names
        stored = await js.get_from_leader(names.stream, seq=seq)
        if stored is not None:
            subject, _, data = stored
            if subject != names.queue(message.to):
                raise IdConflict(message.id)
            return Accepted(decode_item(message.to, data).ts, True, None)
        # It left its queue: its ids record was written before it did (see _clean), in
        # one of the first clean-ups of that pair's messages after it was stored.
        subject, after = names.ids(message.sender, message.to), seq
        for _ in range(_IDS_RECORDS):
            record = await js.get_from_leader(names.stream, next_by_subj=subject,
                                              seq=after + 1)
            if record is None:
                break
            _, after, data = record
            for msg_id, msg_seq, ts in cbor2.loads(data):
                if msg_seq == seq and msg_id == message.id:
                    return Accepted(ts, True, None)
        raise IdConflict(message.id)

    # -- reading -------------------------------------------------------------------------

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries after ``after``; see :meth:`Queues.pending`."""
        queue = self._users.get(user)
        start = max(after, queue.acked if queue is not None else await self._watermark(user))
        replies = await self._js.get_batch(self._names.stream, self._names.queue(user),
                                           start, limit)
        entries = [Entry(header_int(reply, "Nats-Sequence"), decode_item(user, reply.data))
                   for reply in replies]
        if queue is not None and len(entries) < limit and queue.known > (
                entries[-1].seq if entries else start):
            # The replica that answered is behind (after a partition, say): this node has
            # seen a later item. Read the rest from the stream's leader.
            entries += await self._from_leader(user, entries[-1].seq if entries else start,
                                               limit - len(entries))
        if queue is not None:
            prev = start  # nothing lies between ``start`` and the first item read
            for entry in entries:
                queue.note(entry, prev)
                prev = entry.seq
        return entries

    async def _from_leader(self, user: str, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` items of ``user``'s queue after ``after``, one by one from the
        stream's leader."""
        entries: list[Entry] = []
        subject = self._names.queue(user)
        while len(entries) < limit and (found := await self._js.get_from_leader(
                self._names.stream, next_by_subj=subject, seq=after + 1)) is not None:
            _, after, data = found
            entries.append(Entry(after, decode_item(user, data)))
        return entries

    def note(self, user: str, entry: Entry, prev: int) -> None:
        """The bus brought ``entry`` of ``user``'s queue (``prev`` the item before it)."""
        queue = self._users.get(user)
        if queue is not None:
            queue.note(entry, prev)

    async def last_seq(self, user: str) -> int:
        """The highest sequence given to ``user``; see :meth:`Queues.last_seq`."""
        last = await self._js.get(self._names.stream, last_by_subj=self._names.queue(user))
        if last is not None:  # the newest item is at or above anything acknowledged
            return header_int(last, "Nats-Sequence")
        # An empty queue: everything given was acknowledged, up to the newest record's
        # watermark (this node's view may be older than another node's record).
        queue = self._users.get(user)
        return max(queue.acked if queue is not None else 0, await self._watermark(user))

    async def _watermark(self, user: str) -> int:
        """The watermark of ``user``'s newest acknowledgement record (0 if none)."""
        record = await self._js.get(self._names.stream,
                                    last_by_subj=self._names.acks(user))
        return int(cbor2.loads(record.data)["u"]) if record is not None else 0

    # -- acknowledging ---------------------------------------------------------------------

    async def acknowledge(self, user: str, status: str, upto: int,
                          peer: str | None = None) -> list[tuple[str, Entry]]:
        """Record an acknowledgement and queue its receipts; see :meth:`Queues.acknowledge`.

        Raises:
            StoreUnavailable: Nothing changed (or, if an earlier record's outbox cannot be
                carried out, nothing new was recorded).
        """
        await self.open(user)
        queue = self._users[user]
        try:
            async with queue.lock:
                await self._carry_out(user, queue)
                for _ in range(_CAS_ATTEMPTS):
                    try:
                        return await self._acknowledge(user, queue, status, upto, peer)
                    except _Overtaken:
                        await self._load(user, queue)
                        await self._carry_out(user, queue)
                raise StoreUnavailable(f"acknowledgements of {user} kept crossing")
        finally:
            self.close(user)

    async def _acknowledge(self, user: str, queue: _UserQueue, status: str, upto: int,
                           peer: str | None) -> list[tuple[str, Entry]]:
        js, names = self._js, self._names
        queued: list[tuple[str, Entry]] = []
        ts = now_ms()
        while True:
            items = await self._items(user, queue, upto)
            final = len(items) < ACK_CHUNK
            step = upto if final else items[-1][0]
            step_status = status if final else "delivered"
            newly = [(seq, sender, msg_id) for seq, kind, sender, msg_id, _ in items
                     if kind == "m"]
            receipts = plan_receipts(user, step_status, step, peer, ts, newly, queue.unread,
                                     self._max_unread)
            if items or receipts:
                unread = queue.unread.copy()
                apply_ack(step_status, step, peer, newly, unread, self._max_unread)
                watermark = max(queue.acked, items[-1][0] if items else 0)
                record: dict[str, Any] = {
                    "u": watermark, "ts": ts, "st": step_status, "up": step, "p": peer,
                    "n": [list(m) for m in newly],
                    "r": [[sender, r.status, list(r.ids), r.ts] for sender, r in receipts]}
                headers = {"Nats-Expected-Last-Subject-Sequence": str(queue.record)}
                whole = len(unread) <= SNAPSHOT_UNREAD or queue.deltas >= MAX_DELTAS
                if whole:
                    record["snap"] = [list(message) for message in unread]
                    headers["Nats-Rollup"] = "sub"
                try:
                    ack = await js.publish(names.acks(user), cbor2.dumps(record), headers)
                except JetStreamError as exc:
                    if exc.code == WRONG_LAST_SEQUENCE:
                        raise _Overtaken from None
                    raise StoreUnavailable(str(exc)) from None
                queue.record, queue.acked, queue.unread = ack.seq, watermark, unread
                queue.deltas = 0 if whole else queue.deltas + 1
                queue.outbox = (ack.seq, record)
                queue.unclean += len(items)
                queue.forget_seen()
                try:
                    queued += await self._carry_out(user, queue)
                    if queue.unclean >= CLEAN_BATCH:
                        await self._clean(user, queue)
                except StoreUnavailable as exc:
                    # The acknowledgement is recorded; what follows from it waits for a
                    # retry (retry()).
                    self._log.warning("receipts_delayed", user=user, reason=str(exc))
                    return queued
            if final:
                return queued

    async def _items(self, user: str, queue: _UserQueue, upto: int
                     ) -> list[tuple[int, str, str, str, int]]:
        """The items above the watermark up to ``upto`` (at most :data:`ACK_CHUNK`), as
        ``(seq, kind, sender, id, ts)``: from those seen when they link up, else read."""
        if upto <= queue.acked:
            return []
        covered = queue.covered(upto)
        if covered is not None and len(covered) <= ACK_CHUNK:
            return covered
        replies = await self._js.get_batch(self._names.stream, self._names.queue(user),
                                           queue.acked, ACK_CHUNK)
        items = []
        for reply in replies:
            seq = header_int(reply, "Nats-Sequence")
            if seq > upto:
                break
            item = decode_item(user, reply.data)
            if isinstance(item, Message):
                items.append((seq, "m", item.sender, item.id, item.ts))
            else:
                items.append((seq, "r", item.by, "", item.ts))
        return items

    async def _carry_out(self, user: str, queue: _UserQueue) -> list[tuple[str, Entry]]:
        """Publish the receipts the newest record promised. Idempotent.

        Returns:
            The receipts queued by this call (not those a previous run had queued).

        Raises:
            StoreUnavailable: They could not all be published; they stay to publish.
        """
        if queue.outbox is None:
            return []
        seq, record = queue.outbox
        names = self._names
        receipts = [(sender, ReceiptItem(status, user, tuple(ids), ts))
                    for sender, status, ids, ts in record["r"]]
        getters = self._js.publish_all([
            (names.queue(sender), encode_item(receipt), {"Nats-Msg-Id": f"r {user} {seq} {k}"})
            for k, (sender, receipt) in enumerate(receipts)])
        queued: list[tuple[str, Entry]] = []
        try:
            for (sender, receipt), get in zip(receipts, getters, strict=True):
                ack = await get()
                if not ack.duplicate:
                    queued.append((sender, Entry(ack.seq, receipt)))
        except JetStreamError as exc:
            raise StoreUnavailable(str(exc)) from None
        queue.outbox = None
        return queued

    async def _clean(self, user: str, queue: _UserQueue) -> None:
        """Remove the acknowledged items from ``user``'s queue: the ids of the messages
        among them first (``NS.i.SENDER.USER``), then the items. Idempotent.

        Raises:
            StoreUnavailable: Not all of it was done; it stays to do.
        """
        js, names = self._js, self._names
        ttl = f"{int(self._window) + 60}s"
        while True:
            replies = await js.get_batch(names.stream, names.queue(user), 0, CLEAN_BATCH)
            done = [reply for reply in replies
                    if header_int(reply, "Nats-Sequence") <= queue.acked]
            if not done:
                queue.unclean = 0
                return
            by_sender: dict[str, list[list[Any]]] = {}
            for reply in done:
                item = decode_item(user, reply.data)
                if isinstance(item, Message):
                    by_sender.setdefault(item.sender, []).append(
                        [item.id, header_int(reply, "Nats-Sequence"), item.ts])
            getters = js.publish_all([(names.ids(sender, user), cbor2.dumps(ids), {"Nats-TTL": ttl})
                                      for sender, ids in by_sender.items()])
            try:
                for get in getters:
                    await get()
                await js.purge(names.stream, names.queue(user),
                               header_int(done[-1], "Nats-Sequence") + 1)
            except JetStreamError as exc:
                raise StoreUnavailable(str(exc)) from None
            if len(done) < len(replies) or len(replies) < CLEAN_BATCH:
                queue.unclean = 0
                return

    async def _load(self, user: str, queue: _UserQueue) -> None:
        """Rebuild ``user``'s watermark and unread memory from their records."""
        js, names = self._js, self._names
        records = []
        after = 0
        while True:
            page = await js.get_batch(names.stream, names.acks(user), after, _PAGE)
            records += page
            if len(page) < _PAGE:
                break
            after = header_int(page[-1], "Nats-Sequence")
        queue.acked, queue.record, queue.deltas, queue.outbox = 0, 0, 0, None
        queue.unread = Unread()
        queue.seen.clear()
        record: dict[str, Any] = {}
        for reply in records:
            record = cbor2.loads(reply.data)
            queue.record = header_int(reply, "Nats-Sequence")
            queue.acked = max(queue.acked, record["u"])
            if "snap" in record:
                queue.unread = Unread(
                    (seq, sender, msg_id) for seq, sender, msg_id in record["snap"])
                queue.deltas = 0
            else:
                newly = [(seq, sender, msg_id) for seq, sender, msg_id in record["n"]]
                apply_ack(record["st"], record["up"], record["p"], newly, queue.unread,
                          self._max_unread)
                queue.deltas += 1
        # The newest record's receipts may not all have been published (its node died):
        # publish them again, unless they would no longer be recognised as duplicates.
        if record and now_ms() - record["ts"] < (self._window - 60) * 1000:
            queue.outbox = (queue.record, record)

    def busy(self) -> list[tuple[str, _UserQueue]]:
        """The queues with receipts to publish or items to clean up, with their users.

        The retry loop looks every second, on a node that may hold tens of thousands of
        idle queues: it copies only the busy ones, since a copy of every entry each second
        kept the garbage collector's full passes busy (issue 14, goal 6).
        """
        return [(user, queue) for user, queue in self._users.items() if not queue.idle()]

    async def retry(self) -> None:
        """Every :data:`RETRY_INTERVAL`: publish the receipts that could not be published,
        and clean up the queues with acknowledged items (forever)."""
        while True:
            await trio.sleep(RETRY_INTERVAL)
            for user, queue in self.busy():
                if queue.idle() or queue.lock.locked():
                    continue
                async with queue.lock:
                    try:
                        await self._carry_out(user, queue)
                        await self._clean(user, queue)
                    except StoreUnavailable:
                        continue
                if queue.refs <= 0 and queue.idle():
                    self._users.pop(user, None)


class _Overtaken(Exception):
    """Another node wrote an acknowledgement record of this user first."""
