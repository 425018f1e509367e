"""Properties of :func:`chatd.cluster.merge.merge_states` and of a queue's form on the wire.

Sans-IO: no node, no store actor, no network. Each example builds two replicas of bob's
queue as two :class:`QueueIndex` instances and applies a random history to them, the way
the cluster's replica operations do (``put`` of a numbered entry, ``apply_ack`` of an
acknowledgement): first a shared history applied to both, then a divergence (entries put on
one side only, the same message put on both sides under different numbers, different items
put on both sides under the same number, acknowledgements made on one side only). The two
replicas are exported with ``QueueIndex.export``, as a hand-off exports them, and merged.

The history is also recorded as ground truth, independent of the merge: which items each
side holds pending, and which it holds acknowledged (put there, then covered by that side's
acknowledgement). The properties are checked against it:

- a message pending on either side and acknowledged on neither is in the result exactly
  once, and one acknowledged on a side is not in it;
- the result's numbers are unique, increasing, above its acknowledgement and at most its
  ``last_seq``; its acknowledgement is the higher of the two;
- merging is idempotent: a state merged with itself, or with a part of itself (such as one
  of the two states it was merged from), is unchanged;
- setting a replica to the result (``QueueIndex.replace``) and exporting it gives the result.

They hold also when a message is held under different numbers on the two sides (worked
examples below: neither lost nor queued again). Receipts have no memory of ids: a receipt
numbered under the other side's acknowledgement is taken as acknowledged, which loses it
when the two sides numbered the queue independently (a split cluster); a worked example
pins this documented limit, and the receipt properties use histories numbered alike.

The wire form (``pack_state``/``unpack_state``, ``pack_entry``/``unpack_entry``) round
trips through CBOR, as link frames carry it, and ``unpack_entry`` refuses malformed fields.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.clock import now_ms
from chatd.cluster.merge import (
    EMPTY,
    merge_states,
    pack_entry,
    pack_state,
    unpack_entry,
    unpack_state,
)
from chatd.store import Entry, Message, ReceiptItem, UserState
from chatd.store._index import QueueIndex

USER = "bob"
SENDERS = ("alice", "carol")
#: Timestamps of generated items: recent, so no id is forgotten by the dedup window.
#: Items are stamped from a minute ago: ids older than the dedup window (a day) are not
#: remembered when a replica is set to a merged state.
TS0 = now_ms() - 60_000

PROPERTIES = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
"""Enough examples to reach the interesting interleavings, derandomized so every run (and
every machine) checks the same cases."""

Key = tuple[Any, ...]


def identity(item: Message | ReceiptItem) -> Key:
    """What names an item across replicas: a message by (sender, id), a receipt by content."""
    if isinstance(item, Message):
        return ("m", item.sender, item.id)
    return ("r", item.status, item.by, item.ids)


def make_item(n: int, receipts: bool = True) -> Message | ReceiptItem:
    """The ``n``-th item of a history: messages to bob, and every fourth a receipt if
    ``receipts`` (for the messages bob sent)."""
    if receipts and n % 4 == 3:
        return ReceiptItem("delivered" if n % 8 == 3 else "read", "dave", (f"x{n}",), TS0 + n)
    return Message(f"m{n}", SENDERS[n % 2], USER, f"body {n}", TS0 + n)


# -- the two replicas and their ground truth ---------------------------------------------


@dataclass
class Side:
    """One replica of bob's queue, and what happened to each item on it."""

    index: QueueIndex = field(default_factory=QueueIndex)
    #: Every item ever queued here, by identity: the seq it was queued at.
    seq_of: dict[Key, int] = field(default_factory=dict)

    def put(self, item: Message | ReceiptItem, seq: int) -> None:
        key = identity(item)
        if key in self.seq_of:
            return  # a replica never holds an item twice (the leader checks message ids)
        if self.index.put(USER, Entry(seq, item)):
            self.seq_of[key] = seq

    def ack(self, status: str, upto: int) -> None:
        self.index.apply_ack(USER, status, upto, None)

    def acknowledged(self) -> set[Key]:
        """The items the user acknowledged on this replica."""
        acked = self.index.acked(USER)
        return {key for key, seq in self.seq_of.items() if seq <= acked}

    def pending(self) -> set[Key]:
        acked = self.index.acked(USER)
        return {key for key, seq in self.seq_of.items() if seq > acked}

    def state(self) -> UserState:
        return self.index.export([USER])[USER]


@dataclass
class Replicas:
    """The leader's replica and the other one."""

    leader: Side
    other: Side


@st.composite
def histories(draw: st.DrawFn, *, renumber: bool = True, receipts: bool = True) -> Replicas:
    """Two replicas of bob's queue after a shared history and a divergence.

    Shared steps put a new item on both sides at the next number, or acknowledge on both.
    Diverging steps happen on one side: a new item at the side's next number (two leaders
    numbering on their own, so different items get the same number), a new item at a given
    number (written by a third node), an item the other side holds put here too (a
    message retried through another leader, or a replication that arrives late) at the
    other side's number or, with ``renumber``, maybe at this side's next number; or an
    acknowledgement.
    """
    replicas = Replicas(Side(), Side())
    both = (replicas.leader, replicas.other)
    items: list[Message | ReceiptItem] = []

    def new_item() -> Message | ReceiptItem:
        items.append(make_item(len(items), receipts))
        return items[-1]

    def ack(sides: tuple[Side, ...]) -> None:
        top = max(side.index.last_seq(USER) for side in sides)
        upto = max(0, top - draw(st.integers(-1, 3), label="behind the last number"))
        status = draw(st.sampled_from(["delivered", "delivered", "read"]))
        for side in sides:
            side.ack(status, upto)

    for _ in range(draw(st.integers(0, 6), label="shared steps")):
        if draw(st.integers(0, 3)):
            item, seq = new_item(), replicas.leader.index.last_seq(USER) + 1
            for side in both:
                side.put(item, seq)
        else:
            ack(both)
    for _ in range(draw(st.integers(1, 14), label="diverging steps")):
        side, peer = both if draw(st.booleans(), label="on the leader") else both[::-1]
        step = draw(st.sampled_from(["new", "new", "copy", "copy", "at", "ack"]))
        if step == "ack":
            ack((side,))
            continue
        if step == "copy":
            theirs = sorted((seq, key) for key, seq in peer.seq_of.items()
                            if key not in side.seq_of)
            if not theirs:
                continue
            seq, key = draw(st.sampled_from(theirs))
            item = next(i for i in items if identity(i) == key)
            if renumber and draw(st.booleans(), label="renumbered"):
                seq = side.index.last_seq(USER) + 1
        else:
            item = new_item()
            seq = (side.index.last_seq(USER) + 1 if step == "new" else
                   draw(st.integers(1, side.index.last_seq(USER) + 3), label="number"))
        side.put(item, seq)
    return replicas


def entries_by_key(state: UserState) -> dict[Key, list[int]]:
    found: dict[Key, list[int]] = {}
    for entry in state.entries:
        found.setdefault(identity(entry.item), []).append(entry.seq)
    return found


def canonical(state: UserState) -> UserState:
    """``state`` with its remembered ids in one order (their order carries no meaning)."""
    return UserState(state.last_seq, state.acked, state.entries, state.unread,
                     tuple(sorted(state.known)))


# -- merge properties --------------------------------------------------------------------


def check_survival(replicas: Replicas) -> None:
    """Every item pending on a side and acknowledged on neither is in the merge, once."""
    leader, other = replicas.leader, replicas.other
    merged = merge_states(leader.state(), other.state())
    found = entries_by_key(merged)
    acknowledged = leader.acknowledged() | other.acknowledged()
    for key in sorted((leader.pending() | other.pending()) - acknowledged):
        assert len(found.get(key, [])) == 1, (
            f"{key} is pending and was never acknowledged, yet the merge holds it "
            f"{len(found.get(key, []))} times: {merged}")


def check_dropped(replicas: Replicas) -> None:
    """No item the user acknowledged on either side is in the merge."""
    leader, other = replicas.leader, replicas.other
    merged = merge_states(leader.state(), other.state())
    redelivered = set(entries_by_key(merged)) & (leader.acknowledged() | other.acknowledged())
    assert not redelivered, f"acknowledged items queued again by the merge: {redelivered}"


def run_property(check: Callable[[Replicas], None], *, renumber: bool, receipts: bool,
                 wide: bool = False) -> None:
    """Check ``check`` over histories of the given kind (``wide``: more of them)."""
    config = settings(PROPERTIES, max_examples=500) if wide else PROPERTIES
    config(given(histories(renumber=renumber, receipts=receipts))(check))()


def test_messages_acknowledged_nowhere_survive_exactly_once() -> None:
    run_property(check_survival, renumber=False, receipts=False)


def test_messages_acknowledged_on_either_side_are_dropped() -> None:
    run_property(check_dropped, renumber=False, receipts=False)


def test_receipts_acknowledged_on_either_side_are_dropped() -> None:
    run_property(check_dropped, renumber=False, receipts=True)


def test_renumbered_messages_acknowledged_nowhere_survive_exactly_once() -> None:
    run_property(check_survival, renumber=True, receipts=False, wide=True)


def test_renumbered_messages_acknowledged_on_either_side_are_dropped() -> None:
    run_property(check_dropped, renumber=True, receipts=False, wide=True)


@PROPERTIES
@given(histories())
def test_result_numbers_are_unique_increasing_and_above_the_acknowledgement(
        replicas: Replicas) -> None:
    left, right = replicas.leader.state(), replicas.other.state()
    merged = merge_states(left, right)
    seqs = [entry.seq for entry in merged.entries]
    assert merged.acked == max(left.acked, right.acked)
    assert all(a < b for a, b in itertools.pairwise(seqs)), f"seqs {seqs} not increasing"
    assert all(seq > merged.acked for seq in seqs), (
        f"seqs {seqs} under the acknowledgement {merged.acked} would never be delivered")
    assert all(seq <= merged.last_seq for seq in seqs), f"seqs {seqs} past {merged.last_seq}"
    assert merged.last_seq >= max(left.last_seq, right.last_seq), "numbers went back"
    # The leader's numbers win: its items above the other side's acknowledgement keep them.
    kept = {identity(e.item): e.seq for e in merged.entries}
    for entry in left.entries:
        if entry.seq > right.acked and identity(entry.item) in kept:
            assert kept[identity(entry.item)] == entry.seq, (
                f"the leader's {entry} was renumbered {kept[identity(entry.item)]}")


@PROPERTIES
@given(histories())
def test_renumbered_items_follow_everything_else_in_their_order(replicas: Replicas) -> None:
    left, right = replicas.leader.state(), replicas.other.state()
    merged = merge_states(left, right)
    now = {identity(e.item): e.seq for e in merged.entries}
    on_leader = {identity(e.item) for e in left.entries}
    moved: list[list[tuple[int, int]]] = []  # per side: (old seq, new seq)
    for candidates in (left.entries,
                       [e for e in right.entries if identity(e.item) not in on_leader]):
        moved.append([(e.seq, now[identity(e.item)]) for e in candidates
                      if identity(e.item) in now and now[identity(e.item)] != e.seq])
    stayed = [seq for seq in now.values()
              if all(seq != new for side in moved for _, new in side)]
    floor = max(left.last_seq, right.last_seq, merged.acked, *stayed)
    for side in moved:
        assert all(new > floor for _, new in side), (
            f"renumbered {side} not after everything else (up to {floor})")
        assert sorted(side) == sorted(side, key=lambda pair: pair[1]), (
            f"renumbered items {side} changed their order")


@PROPERTIES
@given(histories())
def test_unread_and_known_messages_of_either_side_are_kept(replicas: Replicas) -> None:
    left, right = replicas.leader.state(), replicas.other.state()
    merged = merge_states(left, right)
    unread = {seq: (seq, sender, msg_id) for seq, sender, msg_id in merged.unread}
    for seq, sender, msg_id in left.unread:
        assert unread.get(seq) == (seq, sender, msg_id), (
            f"the leader's unread {msg_id} from {sender} lost: no read receipt would follow")
    for seq, sender, msg_id in right.unread:
        assert seq in unread, f"the other side's unread {msg_id} from {sender} lost"
    assert [seq for seq, _, _ in merged.unread] == sorted(unread)
    known = {(sender, msg_id): ts for sender, msg_id, ts in merged.known}
    assert len(known) == len(merged.known), "an id remembered twice"
    for sender, msg_id, _ in right.known + left.known:
        assert (sender, msg_id) in known, (
            f"{msg_id} from {sender} forgotten: a retry of it would be queued again")
    for sender, msg_id, ts in left.known:
        assert known[(sender, msg_id)] == ts


@PROPERTIES
@given(histories())
def test_merging_a_state_with_itself_changes_nothing(replicas: Replicas) -> None:
    for state in (replicas.leader.state(), replicas.other.state()):
        assert merge_states(state, state) == state
    assert merge_states(EMPTY, EMPTY) == EMPTY


@PROPERTIES
@given(histories())
def test_merging_again_with_either_input_changes_nothing(replicas: Replicas) -> None:
    left, right = replicas.leader.state(), replicas.other.state()
    merged = merge_states(left, right)
    assert merge_states(merged, right) == merged, "a repeated hand-off changed the queue"
    assert canonical(merge_states(merged, left)) == canonical(merged), (
        "merging the leader's old state into the result changed it")


@PROPERTIES
@given(histories(), st.data())
def test_merging_a_part_of_a_state_changes_nothing(replicas: Replicas,
                                                   data: st.DataObject) -> None:
    state = merge_states(replicas.leader.state(), replicas.other.state())

    def part(items: tuple[Any, ...]) -> tuple[Any, ...]:
        keep = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)))
        return tuple(x for x, k in zip(items, keep, strict=True) if k)

    # A part that knows a message it no longer holds would say the user acknowledged it:
    # a part forgets the ids of the pending messages it leaves out.
    entries = part(state.entries)
    left_out = {(e.item.sender, e.item.id) for e in state.entries
                if e not in entries and isinstance(e.item, Message)}
    known = tuple(k for k in part(state.known) if (k[0], k[1]) not in left_out)
    subset = UserState(data.draw(st.integers(0, state.last_seq)),
                       data.draw(st.integers(0, state.acked)),
                       entries, part(state.unread), known)
    assert canonical(merge_states(state, subset)) == canonical(state)


@PROPERTIES
@given(histories())
def test_replicas_set_to_the_result_export_it(replicas: Replicas) -> None:
    merged = merge_states(replicas.leader.state(), replicas.other.state())
    for side in (replicas.leader, replicas.other):
        side.index.replace(USER, merged)
        assert canonical(side.state()) == canonical(merged)
        assert side.index.queued(USER) == len(merged.entries)
        assert list(side.index.pending(USER, 0, 10**6)) == list(merged.entries)
    # A second merge of the two replicas, now equal, is the identity.
    again = merge_states(replicas.leader.state(), replicas.other.state())
    assert canonical(again) == canonical(merged)


def test_replace_with_the_empty_state_forgets_the_user() -> None:
    side = Side()
    side.put(make_item(0), 1)
    side.index.replace(USER, EMPTY)
    assert USER not in side.index.names()
    assert side.state() == UserState(0, 0, (), (), side.state().known)


# -- worked examples ---------------------------------------------------------------------


def test_clashing_number_moves_the_other_sides_item_after_everything() -> None:
    a, b, c = make_item(0), make_item(1), make_item(2)
    leader, other = Side(), Side()
    leader.put(a, 1)
    leader.put(b, 2)
    other.put(a, 1)
    other.put(c, 2)  # the same number, another message
    merged = merge_states(leader.state(), other.state())
    assert [(e.seq, e.item) for e in merged.entries] == [(1, a), (2, b), (3, c)]
    assert merged.last_seq == 3


def test_item_under_an_acknowledgement_made_without_it_is_renumbered() -> None:
    a, b, c = make_item(0), make_item(1), make_item(2)
    leader, other = Side(), Side()
    leader.put(a, 1)
    leader.put(b, 2)
    other.put(a, 1)
    other.put(c, 2)  # the other side numbered c 2, and the user acknowledged it
    other.ack("delivered", 2)
    merged = merge_states(leader.state(), other.state())
    assert [(e.seq, e.item) for e in merged.entries] == [(3, b)]
    assert merged.acked == 2


def test_leaders_unread_message_wins_a_clashing_number() -> None:
    a, b = make_item(0), make_item(1)
    leader, other = Side(), Side()
    leader.put(a, 1)
    other.put(b, 1)  # the same number, another message
    leader.ack("delivered", 1)
    other.ack("delivered", 1)
    merged = merge_states(leader.state(), other.state())
    assert isinstance(a, Message)
    assert merged.unread == ((1, a.sender, a.id),)
    assert merged.entries == () and merged.acked == 1


def test_message_numbered_differently_on_each_side_is_not_lost() -> None:
    a, m = make_item(0), make_item(1)
    leader, other = Side(), Side()
    leader.put(m, 1)  # the leader numbered m 1
    other.put(a, 1)
    other.put(m, 2)  # the other side numbered it 2, and the user acknowledged only a
    other.ack("delivered", 1)
    merged = merge_states(leader.state(), other.state())
    assert [e.item for e in merged.entries] == [m], f"m lost: {merged.entries}"


def test_message_acknowledged_under_another_number_is_not_queued_again() -> None:
    a, m = make_item(0), make_item(1)
    leader, other = Side(), Side()
    leader.put(a, 1)
    leader.put(m, 2)  # the leader numbered m 2
    other.put(m, 1)  # the other side numbered it 1, and the user acknowledged it there
    other.ack("delivered", 1)
    merged = merge_states(leader.state(), other.state())
    assert [e.item for e in merged.entries] == [a], f"m queued again: {merged.entries}"


@pytest.mark.parametrize("receipt_on", ["leader", "other"])
def test_a_receipt_under_the_other_sides_acknowledgement_is_taken_as_acknowledged(
        receipt_on: str) -> None:
    # The documented limit (merge.py): receipts carry no ids to remember, so a receipt
    # numbered under the other side's acknowledgement counts as acknowledged. Here the
    # sides numbered the queue independently, and the user never had the receipt.
    m, receipt = make_item(0), make_item(3)
    assert isinstance(receipt, ReceiptItem)
    with_receipt, acknowledging = Side(), Side()
    with_receipt.put(receipt, 1)
    acknowledging.put(m, 1)  # the user acknowledged m, never the receipt
    acknowledging.ack("delivered", 1)
    sides = ((with_receipt, acknowledging) if receipt_on == "leader"
             else (acknowledging, with_receipt))
    merged = merge_states(sides[0].state(), sides[1].state())
    assert merged.entries == () and merged.acked == 1


# -- the wire form -----------------------------------------------------------------------


texts = st.text(max_size=12)
ts_values = st.integers(0, 2**53)
seqs = st.integers(1, 2**53)
messages = st.builds(Message, texts, texts, st.just(USER), texts, ts_values)
receipts = st.builds(ReceiptItem, st.sampled_from(["delivered", "read"]), texts,
                     st.lists(texts, max_size=4).map(tuple), ts_values)
entries = st.builds(Entry, seqs, messages | receipts)
states = st.builds(UserState, st.integers(0, 2**53), st.integers(0, 2**53),
                   st.lists(entries, max_size=6).map(tuple),
                   st.lists(st.tuples(seqs, texts, texts), max_size=4).map(tuple),
                   st.lists(st.tuples(texts, texts, ts_values), max_size=4).map(tuple))
ROUND_TRIP = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def over_the_wire(value: Any) -> Any:
    """``value`` as a peer decodes it from a link frame (CBOR: tuples become lists)."""
    return cbor2.loads(cbor2.dumps(value))


@ROUND_TRIP
@given(entries)
def test_entry_round_trips(entry: Entry) -> None:
    assert unpack_entry(USER, pack_entry(entry)) == entry
    assert unpack_entry(USER, over_the_wire(pack_entry(entry))) == entry


@ROUND_TRIP
@given(states)
def test_state_round_trips(state: UserState) -> None:
    assert unpack_state(USER, pack_state(state)) == state
    assert unpack_state(USER, over_the_wire(pack_state(state))) == state


@PROPERTIES
@given(histories())
def test_exported_states_round_trip(replicas: Replicas) -> None:
    for state in (replicas.leader.state(), replicas.other.state()):
        assert unpack_state(USER, over_the_wire(pack_state(state))) == state


GOOD_MESSAGE = [5, "m", "m1", "alice", "hi", 7]
GOOD_RECEIPT = [6, "r", "read", "alice", ["m1", "m2"], 7]


def replaced(fields: list[Any], at: int, value: Any) -> list[Any]:
    return [value if i == at else f for i, f in enumerate(fields)]


MALFORMED: list[tuple[str, Any]] = [
    ("empty", []),
    ("a map", {"seq": 5, "kind": "m"}),
    ("message missing ts", GOOD_MESSAGE[:-1]),
    ("message with an extra field", [*GOOD_MESSAGE, 1]),
    ("receipt missing ts", GOOD_RECEIPT[:-1]),
    ("unknown kind", replaced(GOOD_MESSAGE, 1, "x")),
    ("seq as text", replaced(GOOD_MESSAGE, 0, "5")),
    ("seq as float", replaced(GOOD_MESSAGE, 0, 5.0)),
    ("seq missing", replaced(GOOD_MESSAGE, 0, None)),
    ("id as int", replaced(GOOD_MESSAGE, 2, 1)),
    ("sender as None", replaced(GOOD_MESSAGE, 3, None)),
    ("body as bytes", replaced(GOOD_MESSAGE, 4, b"hi")),
    ("ts as text", replaced(GOOD_MESSAGE, 5, "7")),
    ("receipt status as int", replaced(GOOD_RECEIPT, 2, 1)),
    ("receipt by as list", replaced(GOOD_RECEIPT, 3, ["alice"])),
    ("receipt ids as text", replaced(GOOD_RECEIPT, 4, "m1")),
    ("receipt ts as float", replaced(GOOD_RECEIPT, 5, 7.5)),
]


def test_unpack_entry_takes_well_formed_fields() -> None:
    assert unpack_entry(USER, GOOD_MESSAGE) == Entry(5, Message("m1", "alice", USER, "hi", 7))
    assert unpack_entry(USER, GOOD_RECEIPT) == Entry(6, ReceiptItem("read", "alice",
                                                                    ("m1", "m2"), 7))


@pytest.mark.parametrize("fields", [f for _, f in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_unpack_entry_refuses_malformed_fields(fields: Any) -> None:
    with pytest.raises(ValueError):
        unpack_entry(USER, fields)


def test_unpack_state_refuses_a_malformed_entry() -> None:
    packed = pack_state(UserState(6, 0, (Entry(6, Message("m1", "alice", USER, "hi", 7)),),
                                  (), ()))
    packed[2][0] = replaced(packed[2][0], 1, "x")
    with pytest.raises(ValueError):
        unpack_state(USER, packed)
    with pytest.raises(ValueError):
        unpack_state(USER, packed[:4])
