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
  the change, and it is durable before the acknowledgement returns; then its *outbox* is
  carried out: the receipts are published to their senders' queues, the ids records to
  ``NS.i.SENDER.USER`` (kept for the dedup window with ``Nats-TTL``), and the queue is
  purged up to the watermark. Each step is idempotent (``Nats-Msg-Id``), so whoever opens
  the queue next (after a crash, on any node) carries out the newest record's outbox
  again, and nothing a record promised is lost.

A node keeps the watermark and unread memory of the users whose sessions it holds
(:meth:`NatsQueues.open` loads them from the records), and serializes their
acknowledgements.
"""

from __future__ import annotations

import collections
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

from ._jetstream import WRONG_LAST_SEQUENCE, JetStream, JetStreamError, header_int
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
#: Attempts at an acknowledgement that finds another node's record in its way.
_CAS_ATTEMPTS = 4
#: Seconds between retries of an outbox that failed.
RETRY_INTERVAL = 1.0


class _UserQueue:
    """What this node keeps of a queue whose session it holds."""

    __slots__ = ("acked", "deltas", "lock", "outbox", "record", "refs", "unread")

    def __init__(self) -> None:
        self.refs = 0
        self.acked = 0  # every item up to here has been acknowledged
        self.unread: Unread = collections.OrderedDict()
        self.record = 0  # the sequence of the newest acknowledgement record, 0 if none
        self.deltas = 0  # records since the last one holding the whole unread memory
        self.outbox: tuple[int, dict[str, Any]] | None = None  # a record to carry out
        self.lock = trio.Lock()

    def idle(self) -> bool:
        """Whether nothing is left to carry out."""
        return self.outbox is None


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
        except BaseException:
            self.close(user)
            raise

    def close(self, user: str) -> None:
        """Forget ``user``'s queue once its last local session is gone."""
        queue = self._users.get(user)
        if queue is not None:
            queue.refs -= 1
            if queue.refs <= 0 and queue.outbox is None:
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
        getters = self._js.publish_all([
            (names.queue(m.to), encode_item(m), {"Nats-Msg-Id": f"{m.sender} {m.id}"})
            for m in messages])
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

        Raises:
            IdConflict: The original went to another recipient.
        """
        js, names = self._js, self._names
        stored = await js.get(names.stream, seq=seq)
        if stored is not None:
            if stored.headers.get("Nats-Subject") != names.queue(message.to):
                raise IdConflict(message.id)
            return Accepted(decode_item(message.to, stored.data).ts, True, None)
        # It left its queue: its ids record was written before it did (see _carry_out).
        after = seq
        while True:
            records = await js.get_batch(names.stream, names.ids(message.sender, message.to),
                                         after, _PAGE)
            for record in records:
                for msg_id, msg_seq, ts in cbor2.loads(record.data):
                    if msg_seq == seq and msg_id == message.id:
                        return Accepted(ts, True, None)
            if len(records) < _PAGE:
                raise IdConflict(message.id)
            after = header_int(records[-1], "Nats-Sequence")

    # -- reading -------------------------------------------------------------------------

    async def pending(self, user: str, after: int, limit: int) -> Sequence[Entry]:
        """Up to ``limit`` queued entries after ``after``; see :meth:`Queues.pending`."""
        queue = self._users.get(user)
        start = max(after, queue.acked if queue is not None else 0)
        replies = await self._js.get_batch(self._names.stream, self._names.queue(user),
                                           start, limit)
        return [Entry(header_int(reply, "Nats-Sequence"), decode_item(user, reply.data))
                for reply in replies]

    async def last_seq(self, user: str) -> int:
        """The highest sequence given to ``user``; see :meth:`Queues.last_seq`."""
        js, names = self._js, self._names
        last = await js.get(names.stream, last_by_subj=names.queue(user))
        if last is not None:  # the newest item is at or above anything acknowledged
            return header_int(last, "Nats-Sequence")
        # An empty queue: everything given was acknowledged, up to the newest record's
        # watermark (this node's view may be older than another node's record).
        record = await js.get(names.stream, last_by_subj=names.acks(user))
        queue = self._users.get(user)
        acked = queue.acked if queue is not None else 0
        return max(acked, int(cbor2.loads(record.data)["u"]) if record is not None else 0)

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
            items: list[Entry] = []
            if upto > queue.acked:
                replies = await js.get_batch(names.stream, names.queue(user), queue.acked,
                                             ACK_CHUNK)
                items = [entry for reply in replies
                         if (entry := Entry(header_int(reply, "Nats-Sequence"),
                                            decode_item(user, reply.data))).seq <= upto]
            final = len(items) < ACK_CHUNK
            step = upto if final else items[-1].seq
            step_status = status if final else "delivered"
            left = [(e.seq, e.item.sender, e.item.id, e.item.ts) for e in items
                    if isinstance(e.item, Message)]
            newly = [(seq, sender, msg_id) for seq, sender, msg_id, _ in left]
            receipts = plan_receipts(user, step_status, step, peer, ts, newly, queue.unread,
                                     self._max_unread)
            if items or receipts:
                unread = collections.OrderedDict(queue.unread)
                apply_ack(step_status, step, peer, newly, unread, self._max_unread)
                watermark = max(queue.acked, items[-1].seq if items else 0)
                record: dict[str, Any] = {
                    "u": watermark, "ts": ts, "st": step_status, "up": step, "p": peer,
                    "n": [list(m) for m in left],
                    "r": [[sender, r.status, list(r.ids), r.ts] for sender, r in receipts]}
                headers = {"Nats-Expected-Last-Subject-Sequence": str(queue.record)}
                whole = len(unread) <= SNAPSHOT_UNREAD or queue.deltas >= MAX_DELTAS
                if whole:
                    record["snap"] = [[seq, sender, msg_id]
                                      for seq, (sender, msg_id) in unread.items()]
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
                try:
                    queued += await self._carry_out(user, queue)
                except StoreUnavailable as exc:
                    # The acknowledgement is recorded; its outbox waits for a retry.
                    self._log.warning("receipts_delayed", user=user, reason=str(exc))
                    return queued
            if final:
                return queued

    async def _carry_out(self, user: str, queue: _UserQueue) -> list[tuple[str, Entry]]:
        """Do what the newest record promised: queue its receipts, write its ids records,
        purge the queue up to its watermark. Idempotent.

        Returns:
            The receipts queued by this call (not those a previous run had queued).

        Raises:
            StoreUnavailable: Some of it could not be done; it stays to do.
        """
        if queue.outbox is None:
            return []
        seq, record = queue.outbox
        js, names = self._js, self._names
        messages: list[tuple[str, bytes, dict[str, str] | None]] = []
        receipts: list[tuple[str, ReceiptItem]] = []
        for k, (sender, status, ids, ts) in enumerate(record["r"]):
            receipt = ReceiptItem(status, user, tuple(ids), ts)
            receipts.append((sender, receipt))
            messages.append((names.queue(sender), encode_item(receipt),
                             {"Nats-Msg-Id": f"r {user} {seq} {k}"}))
        by_sender: dict[str, list[list[Any]]] = {}
        for msg_seq, sender, msg_id, ts in record["n"]:
            by_sender.setdefault(sender, []).append([msg_id, msg_seq, ts])
        ttl = f"{int(self._window) + 60}s"
        for sender, ids_left in by_sender.items():
            messages.append((names.ids(sender, user), cbor2.dumps(ids_left),
                             {"Nats-Msg-Id": f"t {user} {seq} {sender}", "Nats-TTL": ttl}))
        queued: list[tuple[str, Entry]] = []
        try:
            getters = js.publish_all(messages)
            for at, get in enumerate(getters):
                ack = await get()
                if at < len(receipts) and not ack.duplicate:
                    sender, receipt = receipts[at]
                    queued.append((sender, Entry(ack.seq, receipt)))
            await js.purge(names.stream, names.queue(user), record["u"] + 1)
        except JetStreamError as exc:
            raise StoreUnavailable(str(exc)) from None
        queue.outbox = None
        return queued

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
        queue.unread = collections.OrderedDict()
        record: dict[str, Any] = {}
        for reply in records:
            record = cbor2.loads(reply.data)
            queue.record = header_int(reply, "Nats-Sequence")
            queue.acked = max(queue.acked, record["u"])
            if "snap" in record:
                queue.unread = collections.OrderedDict(
                    (seq, (sender, msg_id)) for seq, sender, msg_id in record["snap"])
                queue.deltas = 0
            else:
                newly = [(seq, sender, msg_id) for seq, sender, msg_id, _ in record["n"]]
                apply_ack(record["st"], record["up"], record["p"], newly, queue.unread,
                          self._max_unread)
                queue.deltas += 1
        # The newest record's outbox may not have been carried out (its node died):
        # carry it out again, unless its receipts would no longer be recognised as
        # duplicates.
        if record and now_ms() - record["ts"] < (self._window - 60) * 1000:
            queue.outbox = (queue.record, record)

    async def retry(self) -> None:
        """Carry out the outboxes that failed, every :data:`RETRY_INTERVAL` (forever)."""
        while True:
            await trio.sleep(RETRY_INTERVAL)
            for user, queue in list(self._users.items()):
                if queue.outbox is None or queue.lock.locked():
                    continue
                async with queue.lock:
                    try:
                        await self._carry_out(user, queue)
                    except StoreUnavailable:
                        continue
                if queue.refs <= 0 and queue.idle():
                    self._users.pop(user, None)


class _Overtaken(Exception):
    """Another node wrote an acknowledgement record of this user first."""
