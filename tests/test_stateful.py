"""A stateful property test: random sessions of three users against a real node.

Hypothesis generates sequences of steps (connect, takeover, disconnect, send, concurrent
bursts of sends, re-send, ack, read, last seen, checkpoint, node restart) and runs each
step against a real :class:`Node` on a loopback port, over real WebSocket connections made
with the client library: :class:`TestChat` with the default durable store in a temporary
directory, :func:`test_chat_on_nats` on the NATS backend (the session's nats-server, each
example in a namespace of its own). A
reference model, plain Python, predicts what every user must receive; after each step the
test waits until every connected user has received everything the store holds for them,
then checks what arrived against the model. docs/testing.md states the model, the rules
and the invariants.

Hypothesis state machines are synchronous and the node runs on trio, so each example runs a
trio event loop in a helper thread (:class:`TrioThread`); the rules call into it with
``trio.from_thread.run``, every call under a deadline. Nothing waits for time to pass:
"everything has arrived" is a condition on the queues (no queued item beyond the last one a
connection received), polled when events come in.

Profiles: ``ci`` (the default) and ``long``, chosen with the environment variable
``HYPOTHESIS_PROFILE``; they apply to this state machine only (see :data:`PROFILE`).
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from natsservers import NatsServer

from chatd.auth import load_or_create_secret, mint_token
from chatd.backends import Queues
from chatd.backends.embedded import DurableStore
from chatd.client import ChatError, Client, Closed, Event, connect
from chatd.config import Config, load_config
from chatd.node import Node
from chatd.protocol import Error, Msg, Presence, Receipt, Sent

T = TypeVar("T")

USERS = ("alice", "bob", "carol")
#: What a (re)connecting client passes as ``resume``: 0, its ``Client.last_seq`` (the
#: highest seq it acknowledged), or the highest seq its application ever received.
RESUME = ("zero", "acked", "received")

#: The only way the node may end a connection in this test, and its close code.
CLOSE_CODES = {"session_replaced": 4409}

STEP_DEADLINE = 15.0
"""Seconds one call into the node's event loop may take."""
SETTLE_DEADLINE = 5.0
"""Seconds for every queued item to reach the connected users after a step."""
THREAD_DEADLINE = 30.0
"""Seconds for the helper thread to start or to stop."""

# Profiles under names of their own: Hypothesis has a built-in "ci" profile that it loads
# for every test when it detects CI, so registering "ci" here would change all the tests.
# Unset settings come from the active profile (derandomize and no database under CI).
settings.register_profile(
    "chatd-stateful-ci", max_examples=100, stateful_step_count=30, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "chatd-stateful-long", max_examples=1000, stateful_step_count=50, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
# On NATS every step costs round trips to a nats-server that fsyncs: fewer examples in CI.
settings.register_profile(
    "chatd-stateful-nats-ci", max_examples=40, stateful_step_count=30, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "chatd-stateful-nats-long", max_examples=1000, stateful_step_count=50, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
"""``ci`` (the default) or ``long``: which of the two profiles above the machine runs with."""

#: Namespaces of the examples run on NATS.
NAMESPACES = itertools.count(1)

#: Steps run per rule name (and invariant checks, and final checks), for reporting.
STEPS: collections.Counter[str] = collections.Counter()


class Violation(AssertionError):
    """The node did something the model says it must not."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`Violation` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Violation(message)


# -- the node side: a trio loop in a thread, a node, connections ----------------------------


class TrioThread:
    """A trio event loop in a daemon thread; :meth:`call` runs a coroutine function in it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self.crash: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="chatd-stateful", daemon=True)
        self._thread.start()
        if not self._ready.wait(THREAD_DEADLINE) or self.nursery is None:
            raise RuntimeError(f"the trio thread did not start: {self.crash!r}")

    def _main(self) -> None:
        try:
            trio.run(self._root)
        except BaseException as exc:  # reported by call() and close()
            self.crash = exc
        finally:
            self._ready.set()

    async def _root(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, afn: Callable[..., Awaitable[T]], *args: Any,
             deadline: float = STEP_DEADLINE) -> T:
        """Run ``await afn(*args)`` in the loop, failing with TooSlowError after ``deadline``."""
        async def bounded() -> T:
            with trio.fail_after(deadline):
                return await afn(*args)

        if self.crash is not None:
            raise RuntimeError("the trio thread died") from self.crash
        return trio.from_thread.run(bounded, trio_token=self._token)

    def close(self) -> None:
        """Cancel whatever still runs in the loop and join the thread."""
        if self._thread.is_alive() and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(THREAD_DEADLINE)
        if self._thread.is_alive():
            raise RuntimeError("the trio thread did not stop")


class Conn:
    """One client-library connection; a task of the loop reads its events into a buffer."""

    def __init__(self, serial: int, user: str) -> None:
        self.serial = serial
        self.user = user
        self.client: Client | None = None
        self.events: list[Event] = []
        """Events received and not yet handed to the model."""
        self.max_seq = 0
        """The highest item (msg or receipt) seq received on this connection."""
        self.scope = trio.CancelScope()
        """Around the reading only; cancelled to close the connection from our side."""
        self.done = trio.Event()
        self.closed: Closed | None = None
        """How the server ended the connection (None if we closed it or it is open)."""
        self.failure: Exception | None = None
        self.closed_by_us = False
        self.reported = False
        """Its end was handed to the model (it stays here for its ``Client.last_seq``)."""


@dataclass
class Batch:
    """What one connection brought since the last settle, handed from the loop to the model."""

    serial: int
    user: str
    events: list[Event]
    ended: bool
    closed: Closed | None
    closed_by_us: bool
    failure: Exception | None


class Harness:
    """The node and the connections, driven from the Hypothesis thread through a TrioThread.

    Every ``async`` method runs in the loop (through :meth:`TrioThread.call`).
    """

    def __init__(self, data_dir: Path, nats: dict[str, Any]) -> None:
        self.config: Config = load_config(data_dir=data_dir, port=0,
                                          # Connected users stay online for a whole run.
                                          online_threshold=3600.0, **nats)
        self.secret = load_or_create_secret(self.config.secret_path)
        self.loop = TrioThread()
        self.node: Node | None = None
        self.node_done = trio.Event()
        self.node_failure: Exception | None = None
        self.conns: dict[int, Conn] = {}
        self._serial = 0
        self._activity = trio.Event()

    @property
    def queues(self) -> Queues:
        assert self.node is not None
        return self.node.backend.queues

    # -- the node -------------------------------------------------------------------------

    async def start_node(self) -> None:
        """Start a new Node on the data directory and wait until it listens."""
        node, done = Node(self.config), trio.Event()
        self.node, self.node_done, self.node_failure = node, done, None
        assert self.loop.nursery is not None
        try:
            await self.loop.nursery.start(self._run_node, node, done)
        except RuntimeError:
            if self.node_failure is not None:
                raise self.node_failure from None
            raise

    async def _run_node(self, node: Node, done: trio.Event, *,
                        task_status: trio.TaskStatus[Node]) -> None:
        try:
            await node.run(task_status=task_status)
        except Exception as exc:  # reported by settle(): the node must not fail
            self.node_failure = exc
        finally:
            done.set()
            self._activity.set()

    async def stop_node(self) -> None:
        """Graceful shutdown; return once ``Node.run`` has returned."""
        assert self.node is not None
        self.node.request_shutdown()
        await self.node_done.wait()
        if self.node_failure is not None:
            raise self.node_failure

    async def checkpoint(self) -> None:
        """Make the durable store write a checkpoint and drop its older segments now."""
        assert self.node is not None and self.node.backend.engine == "embedded"
        store = self.node.backend.store  # type: ignore[attr-defined]
        assert isinstance(store, DurableStore)
        await store.checkpoint()

    # -- connections ----------------------------------------------------------------------

    async def open(self, user: str, resume: int) -> int:
        """Connect ``user`` with ``resume``; return the connection's serial once welcomed."""
        self._serial += 1
        conn = self.conns[self._serial] = Conn(self._serial, user)
        assert self.loop.nursery is not None
        try:
            await self.loop.nursery.start(self._serve, conn, resume)
        except BaseException:
            del self.conns[conn.serial]
            raise
        return conn.serial

    async def _serve(self, conn: Conn, resume: int, *, task_status: trio.TaskStatus[None]
                     ) -> None:
        assert self.node is not None
        token = mint_token(self.secret, conn.user, 3600)
        started = False
        try:
            async with (connect(self.node.url, token, resume=resume,
                                timeout=STEP_DEADLINE) as client,
                        aclosing(client.events()) as events):  # type: ignore[type-var]
                conn.client = client
                task_status.started()
                started = True
                # Only the reading is cancelled to close: leaving ``connect`` normally lets
                # it do the WebSocket close handshake (a cancelled ``connect`` cannot read
                # the server's answer, and waits 2 s for it).
                with conn.scope:
                    async for event in events:
                        if isinstance(event, Msg | Receipt):
                            conn.max_seq = max(conn.max_seq, event.seq)
                        conn.events.append(event)
                        self._activity.set()
                    conn.closed = client.closed
        except Exception as exc:
            if not started:
                raise
            conn.failure = exc
        finally:
            conn.done.set()
            self._activity.set()

    async def close(self, serial: int) -> None:
        """Close a connection from the client side (close code 1000) and wait for its end."""
        conn = self.conns[serial]
        conn.closed_by_us = True
        conn.scope.cancel()
        await conn.done.wait()

    async def wait_closed(self, serial: int) -> None:
        """Wait until the server has ended a connection."""
        await self.conns[serial].done.wait()

    def last_seq(self, serial: int) -> int:
        """The connection's ``Client.last_seq`` (what it would pass as ``resume``)."""
        client = self.conns[serial].client
        assert client is not None
        return client.last_seq

    def _client(self, serial: int) -> Client:
        client = self.conns[serial].client
        assert client is not None
        return client

    async def send(self, serial: int, to: str, body: str, msg_id: str) -> Sent:
        return await self._client(serial).send(to, body, id=msg_id)

    async def acknowledge(self, serial: int, status: str, upto: int, peer: str | None
                          ) -> None:
        """Send an ack, then make a round trip so the node has acted on it (it acts on a
        connection's frames in order), and its receipts are in the store."""
        client = self._client(serial)
        if status == "read":
            await client.read(upto, peer)
        else:
            await client.ack(upto)
        await client.last_seen(client.user)

    async def last_seen(self, serial: int, user: str) -> Presence:
        return await self._client(serial).last_seen(user)

    async def burst(self, sends: dict[int, list[tuple[str, str, str]]],
                    join: tuple[str, int] | None) -> tuple[dict[int, list[Sent]], int | None]:
        """Concurrently: each connection sends its ``(to, body, id)`` messages one after
        the other, and ``join`` = (user, resume), if given, connects.

        Returns the ``sent`` frames by connection, and the serial of the new connection.
        """
        answers: dict[int, list[Sent]] = {serial: [] for serial in sends}
        joined: list[int] = []

        async def send_all(serial: int, messages: list[tuple[str, str, str]]) -> None:
            for to, body, msg_id in messages:
                answers[serial].append(await self.send(serial, to, body, msg_id))

        async def connect_one(user: str, resume: int) -> None:
            joined.append(await self.open(user, resume))

        async with trio.open_nursery() as nursery:
            for serial, messages in sends.items():
                nursery.start_soon(send_all, serial, messages)
            if join is not None:
                nursery.start_soon(connect_one, *join)
        return answers, joined[0] if joined else None

    async def settle(self, live: list[int]) -> tuple[list[Batch], list[str]]:
        """Wait until every live connection has received all its user's queued items.

        Returns the events each connection brought since the last call (and whether it
        ended), and the users still behind when the deadline passed.
        """
        behind: list[str] = []
        with trio.move_on_after(SETTLE_DEADLINE):
            while True:
                self._activity = trio.Event()
                behind = [f"{c.user} (conn {c.serial}: queued {pending[0].seq} and on, "
                          f"received up to {c.max_seq})"
                          for c in (self.conns[s] for s in live)
                          if not c.done.is_set()
                          and (pending := await self.queues.pending(c.user, c.max_seq, 1))]
                if not behind or self.node_failure is not None:
                    break
                with trio.move_on_after(0.05):
                    await self._activity.wait()
        batches = []
        for serial in sorted(self.conns):
            conn = self.conns[serial]
            if conn.reported:
                continue
            conn.reported = conn.done.is_set()
            batches.append(Batch(serial, conn.user, conn.events, conn.reported, conn.closed,
                                 conn.closed_by_us, conn.failure))
            conn.events = []
        return batches, behind

    async def shutdown(self) -> None:
        """Close every connection, then stop the node."""
        for serial in [s for s, c in self.conns.items() if not c.done.is_set()]:
            await self.close(serial)
        if self.node is not None and not self.node_done.is_set():
            await self.stop_node()


# -- the reference model ------------------------------------------------------------------


@dataclass
class Record:
    """A message the node answered with ``sent`` (not a duplicate)."""

    sender: str
    recipient: str
    id: str
    body: str
    ts: int
    index: int
    """Position among the messages from ``sender`` to ``recipient``, in send order."""
    seq: int | None = None
    """The seq it arrived with (the recipient's queue), once it arrived."""
    delivered_acked: bool = False
    read: bool = False
    delivered_receipt: int | None = None
    """The seq (sender's queue) of the ``delivered`` receipt naming it, once it arrived."""
    read_receipt: int | None = None


@dataclass
class ConnModel:
    """What the model knows of one connection."""

    serial: int
    user: str
    seqs: set[int] = field(default_factory=set)
    last_seq: int = 0
    expect_close: str | None = None
    """The error code the server is expected to end this connection with."""


@dataclass
class UserModel:
    """What the model knows of one user."""

    conn: ConnModel | None = None
    last_serial: int | None = None
    acked: int = 0
    """Every item of the user's queue with seq <= acked is acknowledged (gone)."""
    client_last_seq: int = 0
    """``Client.last_seq`` of the user's latest connection, as the library documents it."""
    max_seen: int = 0
    items: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    """Every item the user ever received, by seq."""
    next_id: int = 0
    sent: list[Record] = field(default_factory=list)
    """Messages this user sent, in send order."""


class Model:
    """The reference model: what each user must, may and must not receive."""

    def __init__(self) -> None:
        self.users = {user: UserModel() for user in USERS}
        self.records: dict[tuple[str, str], Record] = {}
        self.pairs: dict[tuple[str, str], list[Record]] = collections.defaultdict(list)
        self.conns: dict[int, ConnModel] = {}
        self.seen: set[str] = set()  # last seen is kept across restarts (durable store)

    def connected(self) -> list[str]:
        return [user for user, state in self.users.items() if state.conn is not None]

    # -- steps ----------------------------------------------------------------------------

    def resume_value(self, user: str, mode: str) -> int:
        state = self.users[user]
        return {"zero": 0, "acked": state.client_last_seq, "received": state.max_seen}[mode]

    def opened(self, user: str, serial: int, resume: int) -> None:
        """``user`` connected with ``resume``; a previous connection is being replaced."""
        state = self.users[user]
        if state.conn is not None:
            state.conn.expect_close = "session_replaced"
        state.conn = self.conns[serial] = ConnModel(serial, user)
        state.last_serial = serial
        state.client_last_seq = resume
        self.seen.add(user)
        if resume > 0:
            self._acknowledge(user, "delivered", resume, None)

    def closed(self, user: str) -> None:
        self.users[user].conn = None

    def new_message(self, sender: str, recipient: str) -> tuple[str, str]:
        state = self.users[sender]
        state.next_id += 1
        return f"m{state.next_id}", f"{sender} to {recipient}, #{state.next_id}"

    def accepted(self, sender: str, recipient: str, msg_id: str, body: str, sent: Sent
                 ) -> None:
        check((sent.id, sent.dup) == (msg_id, False),
              f"a new message got {sent!r}, expected id={msg_id!r} dup=False")
        check(sent.ts > 0, f"sent.ts must be a positive time: {sent!r}")
        pair = self.pairs[sender, recipient]
        record = Record(sender, recipient, msg_id, body, sent.ts, len(pair))
        pair.append(record)
        self.records[sender, msg_id] = record
        self.users[sender].sent.append(record)

    def acknowledged(self, user: str, status: str, upto: int, peer: str | None) -> None:
        state = self.users[user]
        state.client_last_seq = max(state.client_last_seq, upto)
        self._acknowledge(user, status, upto, peer)

    def _acknowledge(self, user: str, status: str, upto: int, peer: str | None) -> None:
        """An acknowledgement took effect (the node acted on it); every seq involved here is
        one the user received, so the node's clamp never applies."""
        state = self.users[user]
        state.acked = max(state.acked, upto)
        mine = [r for r in self.records.values()
                if r.recipient == user and r.seq is not None and r.seq <= upto]
        for record in mine:
            record.delivered_acked = True
        if status == "read":
            for record in mine:
                if peer is None or record.sender == peer:
                    record.read = True

    def ack_point(self, user: str, behind: int) -> int:
        """The seq ``behind`` places before the newest one received on the connection (the
        acknowledged point ``acked`` is the oldest choice)."""
        state = self.users[user]
        assert state.conn is not None
        points = sorted(state.conn.seqs | {state.acked})
        return points[max(0, len(points) - 1 - behind)]

    # -- what arrives ---------------------------------------------------------------------

    def on_batch(self, batch: Batch) -> None:
        conn = self.conns[batch.serial]
        for event in batch.events:
            match event:
                case Msg():
                    self._on_msg(conn, event)
                case Receipt():
                    self._on_receipt(conn, event)
                case Error(code=code) if code == conn.expect_close:
                    pass
                case _:
                    raise Violation(f"{conn.user} (conn {conn.serial}) got an unexpected "
                                    f"event {event!r}")
        if batch.failure is not None:
            raise Violation(f"{conn.user}'s connection {conn.serial} failed: "
                            f"{batch.failure!r}") from batch.failure
        if batch.ended:
            self.conns.pop(batch.serial)
            if batch.closed_by_us:
                return
            # Protocol 2.7, 2.8, 6.3: the node announces every close it decides on with an
            # error frame, then closes with that error's close code.
            closed = batch.closed
            error = closed.error.code if closed is not None and closed.error else None
            check(conn.expect_close is not None and error == conn.expect_close
                  and closed is not None and closed.code == CLOSE_CODES[conn.expect_close],
                  f"the node ended {conn.user}'s connection {conn.serial}: {closed!r}; "
                  f"expected an error frame {conn.expect_close!r}, then its close code")
            if self.users[conn.user].conn is conn:
                self.users[conn.user].conn = None

    def _on_item(self, conn: ConnModel, seq: int, content: tuple[Any, ...]) -> bool:
        """Checks common to messages and receipts; True if the item is new to the user."""
        state = self.users[conn.user]
        where = f"{conn.user} (conn {conn.serial})"
        check(seq > conn.last_seq,
              f"{where}: seq {seq} after seq {conn.last_seq} on the same connection")
        conn.last_seq = seq
        conn.seqs.add(seq)
        check(seq > state.acked,
              f"{where}: got seq {seq} {content} although it acknowledged up to {state.acked}")
        known = state.items.get(seq)
        if known is not None:
            check(known == content,
                  f"{where}: seq {seq} came back as {content}, was {known}")
            return False
        check(seq > state.max_seen,
              f"{where}: a new item has seq {seq}, not above {state.max_seen} already seen")
        state.items[seq] = content
        state.max_seen = seq
        return True

    def _on_msg(self, conn: ConnModel, msg: Msg) -> None:
        where = f"{conn.user} (conn {conn.serial})"
        record = self.records.get((msg.sender, msg.id))
        check(record is not None and record.recipient == conn.user,
              f"{where} got a message that is not one sent to it: {msg!r}")
        assert record is not None
        check(not record.delivered_acked,
              f"{where}: {msg.sender}'s {msg.id} came back after it was acknowledged: {msg!r}")
        new = self._on_item(conn, msg.seq, ("msg", msg.sender, msg.id, msg.body, msg.ts))
        check((msg.body, msg.ts) == (record.body, record.ts),
              f"{where}: {msg!r} differs from what was sent: {record!r}")
        if new:
            check(record.seq is None,
                  f"{where}: {msg.sender}'s {msg.id} came again with a new seq {msg.seq}")
            overtaken = [r.id for r in self.pairs[record.sender, record.recipient]
                         if r.index < record.index and r.seq is None]
            check(not overtaken, f"{where}: {msg.sender}'s {msg.id} arrived before "
                                 f"{overtaken}, sent earlier to the same user")
            record.seq = msg.seq
        else:
            check(record.seq == msg.seq,
                  f"{where}: {msg.sender}'s {msg.id} came with seq {msg.seq}, "
                  f"first with {record.seq}")

    def _on_receipt(self, conn: ConnModel, receipt: Receipt) -> None:
        where = f"{conn.user} (conn {conn.serial})"
        content = ("receipt", receipt.status, receipt.by, tuple(receipt.ids), receipt.ts)
        if not self._on_item(conn, receipt.seq, content):
            return
        check(len(receipt.ids) >= 1, f"{where}: a receipt names no message: {receipt!r}")
        for msg_id in receipt.ids:
            record = self.records.get((conn.user, msg_id))
            check(record is not None and record.recipient == receipt.by,
                  f"{where}: {receipt!r} names {msg_id!r}, which {conn.user} did not send "
                  f"to {receipt.by}")
            assert record is not None
            if receipt.status == "delivered":
                check(record.delivered_acked, f"{where}: {receipt!r} before {receipt.by} "
                                              f"acknowledged {msg_id}")
                check(record.delivered_receipt is None,
                      f"{where}: second delivered receipt for {msg_id} (first at seq "
                      f"{record.delivered_receipt}): {receipt!r}")
                record.delivered_receipt = receipt.seq
            else:
                check(record.read, f"{where}: {receipt!r} before {receipt.by} read {msg_id}")
                check(record.read_receipt is None,
                      f"{where}: second read receipt for {msg_id} (first at seq "
                      f"{record.read_receipt}): {receipt!r}")
                check(record.delivered_receipt is not None
                      and record.delivered_receipt < receipt.seq,
                      f"{where}: read receipt for {msg_id} at seq {receipt.seq} without a "
                      f"delivered receipt before it (delivered: {record.delivered_receipt})")
                record.read_receipt = receipt.seq

    # -- what must have arrived -------------------------------------------------------------

    def check_settled(self, user: str) -> None:
        """``user`` is connected and has received everything queued for them: so every
        message sent to them, every receipt due to them, and again on this connection
        every item they received before and did not acknowledge."""
        state = self.users[user]
        assert state.conn is not None
        for record in self.records.values():
            if record.recipient == user:
                check(record.seq is not None,
                      f"{record.sender}'s {record.id} was SENT but never reached {user}")
            if record.sender == user:
                check(not record.delivered_acked or record.delivered_receipt is not None,
                      f"{user} has no delivered receipt for {record.id} although "
                      f"{record.recipient} acknowledged it")
                check(not record.read or record.read_receipt is not None,
                      f"{user} has no read receipt for {record.id} although "
                      f"{record.recipient} read it")
        missing = sorted(seq for seq in state.items
                         if seq > state.acked and seq not in state.conn.seqs)
        check(not missing, f"{user} (conn {state.conn.serial}) did not get again the "
                           f"unacknowledged items {missing} (acknowledged up to {state.acked})")


# -- the state machine ----------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])

#: Rules that change what the store holds. ``restart`` and ``checkpoint`` wait for one of
#: these since their last run, so that they do not crowd out the traffic.
TRAFFIC = frozenset({"send", "burst", "ack", "read"})


def step(fn: F) -> F:
    """Count the step, and mark the machine broken if it raises (teardown then skips its
    final checks, so the failure reported is the step's own)."""

    @functools.wraps(fn)
    def wrapper(self: ChatMachine, **kwargs: Any) -> Any:
        STEPS[fn.__name__] += 1
        try:
            result = fn(self, **kwargs)
        except BaseException:
            self.broken = True
            raise
        if fn.__name__ in TRAFFIC:
            self.traffic += 1
        return result

    return wrapper  # type: ignore[return-value]


def someone_online(machine: ChatMachine) -> bool:
    return bool(machine.model.connected())


def someone_online_has_sent(machine: ChatMachine) -> bool:
    return bool(machine.online(has_sent=True))


users = st.sampled_from(USERS)


class ChatMachine(RuleBasedStateMachine):
    """Three users, one node, and the model.

    A rule acting as a user who must be connected draws that user from the connected ones
    (Hypothesis prints it as ``Draw n (sender): 'bob'`` just before the step); every other
    argument is in the step's own repr.
    """

    #: Settings that put the node on NATS (set by :func:`test_chat_on_nats`); none: the
    #: embedded durable store.
    nats: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.traffic = 0
        """Steps that changed the store so far (see TRAFFIC)."""
        self.traffic_at = {"restart": 0, "checkpoint": 0}
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-stateful-"))
        self.model = Model()
        try:
            nats = dict(self.nats, nats_namespace=f"s{next(NAMESPACES)}") if self.nats else {}
            self.chat = Harness(self.tmp / "data", nats)
            self.call(self.chat.start_node)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def call(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.chat.loop.call(afn, *args)

    def online(self, *, has_sent: bool = False) -> list[str]:
        """Connected users (who have sent something, if ``has_sent``)."""
        return [user for user in self.model.connected()
                if not has_sent or self.model.users[user].sent]

    def conn(self, user: str) -> int:
        conn = self.model.users[user].conn
        assert conn is not None
        return conn.serial

    def _resume(self, user: str, resume_mode: str) -> int:
        state = self.model.users[user]
        if resume_mode == "acked" and state.last_serial is not None:
            # The library's last_seq moves only with the application's acks.
            real = self.chat.last_seq(state.last_serial)
            check(real == state.client_last_seq,
                  f"{user}: Client.last_seq is {real}, the model says {state.client_last_seq}")
        return self.model.resume_value(user, resume_mode)

    def _opened(self, user: str, serial: int, resume: int) -> None:
        previous = self.model.users[user].conn
        self.model.opened(user, serial, resume)
        if previous is not None:
            # Takeover: the old session is told session_replaced and closed (4409).
            self.call(self.chat.wait_closed, previous.serial)

    def _open(self, user: str, resume_mode: str) -> None:
        resume = self._resume(user, resume_mode)
        self._opened(user, self.call(self.chat.open, user, resume), resume)

    def _close(self, user: str) -> None:
        self.call(self.chat.close, self.conn(user))
        self.model.closed(user)

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.online()) < len(USERS))
    @rule(data=st.data(), resume=st.sampled_from(RESUME))
    @step
    def connect(self, data: st.DataObject, resume: str) -> None:
        """A user who is offline connects."""
        offline = [user for user in USERS if user not in self.online()]
        self._open(data.draw(st.sampled_from(offline), label="user"), resume)

    @precondition(someone_online)
    @rule(data=st.data(), resume=st.sampled_from(RESUME))
    @step
    def take_over(self, data: st.DataObject, resume: str) -> None:
        """A connected user connects again: the new session replaces the old one, which
        the node ends with session_replaced (4409)."""
        self._open(data.draw(st.sampled_from(self.online()), label="user"), resume)

    @precondition(someone_online)
    @rule(data=st.data())
    @step
    def disconnect(self, data: st.DataObject) -> None:
        """A connected user closes their connection (close code 1000)."""
        self._close(data.draw(st.sampled_from(self.online()), label="user"))

    @precondition(someone_online)
    @rule(data=st.data(), recipient=users, count=st.integers(1, 3))
    @step
    def send(self, data: st.DataObject, recipient: str, count: int) -> None:
        """Send ``count`` new messages, one after the other (fresh ids: m1, m2... per
        sender), each once its ``sent`` came back."""
        sender = data.draw(st.sampled_from(self.online()), label="sender")
        for _ in range(count):
            msg_id, body = self.model.new_message(sender, recipient)
            sent = self.call(self.chat.send, self.conn(sender), recipient, body, msg_id)
            self.model.accepted(sender, recipient, msg_id, body, sent)

    @precondition(someone_online)
    @rule(recipient=users, count=st.integers(1, 3),
          join=st.sampled_from((None, *RESUME)))
    @step
    def burst(self, recipient: str, count: int, join: str | None) -> None:
        """Every connected user sends ``count`` new messages to ``recipient``, all senders
        at the same time; with ``join`` (a resume mode), ``recipient`` connects meanwhile
        (taking over if connected, and then not among the senders, whose sends the
        takeover would cut)."""
        senders = [user for user in self.online() if join is None or user != recipient]
        plan: dict[str, list[tuple[str, str, str]]] = {}
        for sender in senders:
            plan[sender] = []
            for _ in range(count):
                msg_id, body = self.model.new_message(sender, recipient)
                plan[sender].append((recipient, body, msg_id))
        resume = self._resume(recipient, join) if join is not None else 0
        answers, serial = self.call(
            self.chat.burst, {self.conn(sender): plan[sender] for sender in senders},
            (recipient, resume) if join is not None else None)
        for sender in senders:
            for (_, body, msg_id), sent in zip(plan[sender], answers[self.conn(sender)],
                                               strict=True):
                self.model.accepted(sender, recipient, msg_id, body, sent)
        if serial is not None:
            self._opened(recipient, serial, resume)

    def _earlier(self, data: st.DataObject, back: int) -> tuple[str, Record]:
        sender = data.draw(st.sampled_from(self.online(has_sent=True)), label="sender")
        sent = self.model.users[sender].sent
        return sender, sent[max(0, len(sent) - 1 - back)]

    @precondition(someone_online_has_sent)
    @rule(data=st.data(), back=st.integers(0, 3))
    @step
    def resend(self, data: st.DataObject, back: int) -> None:
        """Send again, to the same recipient, the id sent ``back`` messages before the
        sender's newest: a duplicate (dup=True, the original ts, nothing delivered)."""
        sender, record = self._earlier(data, back)
        sent = self.call(self.chat.send, self.conn(sender), record.recipient, "again",
                         record.id)
        check((sent.id, sent.dup, sent.ts) == (record.id, True, record.ts),
              f"re-sent {sender}'s {record.id}: got {sent!r}, expected dup=True "
              f"ts={record.ts}")

    @precondition(someone_online_has_sent)
    @rule(data=st.data(), back=st.integers(0, 3))
    @step
    def resend_to_another(self, data: st.DataObject, back: int) -> None:
        """Re-use an earlier id (chosen as in ``resend``) for another recipient, the user
        after the original one: refused with id_conflict, nothing delivered."""
        sender, record = self._earlier(data, back)
        other = USERS[(USERS.index(record.recipient) + 1) % len(USERS)]
        try:
            sent = self.call(self.chat.send, self.conn(sender), other, "conflict", record.id)
        except ChatError as exc:
            check(exc.code == "id_conflict", f"re-using {record.id} for {other}: {exc}")
        else:
            raise Violation(f"re-using {sender}'s {record.id} (to {record.recipient}) for "
                            f"{other} was accepted: {sent!r}")

    @precondition(someone_online)
    @rule(data=st.data(), behind=st.integers(0, 3))
    @step
    def ack(self, data: st.DataObject, behind: int) -> None:
        """Acknowledge as delivered up to the seq received ``behind`` items before the
        newest on this connection (past the oldest: the point already acknowledged)."""
        user = data.draw(st.sampled_from(self.online()), label="user")
        self._acknowledge(user, "delivered", behind, None)

    @precondition(someone_online)
    @rule(data=st.data(), behind=st.integers(0, 3), peer=st.none() | users)
    @step
    def read(self, data: st.DataObject, behind: int, peer: str | None) -> None:
        """Like ``ack``, as read (only ``peer``'s messages when given)."""
        user = data.draw(st.sampled_from(self.online()), label="user")
        self._acknowledge(user, "read", behind, peer)

    def _acknowledge(self, user: str, status: str, behind: int, peer: str | None) -> None:
        upto = self.model.ack_point(user, behind)
        self.call(self.chat.acknowledge, self.conn(user), status, upto, peer)
        self.model.acknowledged(user, status, upto, peer)

    @precondition(someone_online)
    @rule(data=st.data(), about=users)
    @step
    def last_seen(self, data: st.DataObject, about: str) -> None:
        """Ask for ``about``'s presence. Never seen: offline, no last_seen (the durable
        store keeps last seen across a graceful restart). Connected: online (the threshold
        is an hour), with a last_seen."""
        user = data.draw(st.sampled_from(self.online()), label="user")
        presence = self.call(self.chat.last_seen, self.conn(user), about)
        check(presence.user == about and isinstance(presence.online, bool),
              f"{user} asked about {about}: {presence!r}")
        if about not in self.model.seen:
            check(not presence.online and presence.last_seen is None,
                  f"{about} was never seen: {presence!r}")
        else:
            check(isinstance(presence.last_seen, int), f"{about} was seen: {presence!r}")
        if self.model.users[about].conn is not None:
            check(presence.online, f"{about} is connected: {presence!r}")

    def traffic_since(self, what: str) -> bool:
        return self.traffic > self.traffic_at[what]

    @precondition(lambda self: not self.nats and self.traffic_since("checkpoint"))
    @rule()
    @step
    def checkpoint(self) -> None:
        """The durable store writes a checkpoint and deletes its older segments."""
        self.traffic_at["checkpoint"] = self.traffic
        self.call(self.chat.checkpoint)

    @precondition(lambda self: self.traffic_since("restart"))
    @rule()
    @step
    def restart(self) -> None:
        """Close every connection, stop the node gracefully, start a new Node on the same
        data directory."""
        self.traffic_at["restart"] = self.traffic
        for user in self.model.connected():
            self._close(user)
        self.settle()  # what arrived before the close belongs to the model too
        self.call(self.chat.stop_node)
        self.call(self.chat.start_node)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    @step
    def settled(self) -> None:
        """Everything queued reached the connected users, and all of it fits the model."""
        self.settle()
        for user in self.model.connected():
            self.model.check_settled(user)

    def settle(self) -> None:
        live = [state.conn.serial for state in self.model.users.values()
                if state.conn is not None]
        batches, behind = self.call(self.chat.settle, live)
        for batch in batches:
            self.model.on_batch(batch)
        if self.chat.node_failure is not None:
            raise Violation(f"the node failed: {self.chat.node_failure!r}")
        check(not behind, f"queued items never arrived on a live connection: {behind}")

    def teardown(self) -> None:
        """Reconnect everyone, let everything arrive, check it all; then stop."""
        try:
            if not self.broken:
                STEPS["teardown"] += 1
                for user in USERS:
                    if self.model.users[user].conn is None:
                        self._open(user, "acked")
                self.settle()
                for user in USERS:
                    self.model.check_settled(user)
        finally:
            try:
                if self.chat.loop.crash is None:
                    self.call(self.chat.shutdown)
            finally:
                self.chat.loop.close()
                shutil.rmtree(self.tmp, ignore_errors=True)


TestChat = ChatMachine.TestCase
TestChat.settings = settings.get_profile(f"chatd-stateful-{PROFILE}")


def test_chat_on_nats(shared_nats: NatsServer) -> None:
    """The same machine with the node on NATS: every example in a namespace of its own."""
    machine = type("NatsChatMachine", (ChatMachine,), {"nats": {"nats": [shared_nats.url]}})
    run_state_machine_as_test(machine, settings=settings.get_profile(
        f"chatd-stateful-nats-{PROFILE}"))
