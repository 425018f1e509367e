"""What a store remembers of each message once it left the queue, kept compact: its id
(``chatd.backends.embedded._ids``) and its place among the recipient's unread messages
(``chatd.backends._acks.Unread``); each against a plain ordered dict as the model: same
answers, same forgetting order (however the keys collide in the id table, and through
the unread arrays' rebuilds)."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.backends._acks import Unread
from chatd.backends.embedded._ids import IdMemory, id_key

WINDOW = 100


class Model:
    """What the memory must do, the obvious way."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids: collections.OrderedDict[int, tuple[str, int]] = collections.OrderedDict()

    def add(self, key: int, to: str, ts: int) -> None:
        if key not in self.ids and len(self.ids) == self.capacity:
            self.ids.popitem(last=False)
        self.ids[key] = (to, ts)

    def forget(self, now: int) -> None:
        while self.ids and next(iter(self.ids.values()))[1] < now - WINDOW:
            self.ids.popitem(last=False)

    def get(self, key: int) -> tuple[str, int, int] | None:
        found = self.ids.get(key)
        return None if found is None else (found[0], found[1], found[1] + WINDOW)


# Keys from a small range, so that many share their slot in a small table and probe runs
# cross the table's end; and some far apart with the same low bits.
keys = st.one_of(st.integers(0, 40), st.integers(-3, 3).map(lambda k: k * 2**40 + 7))
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), keys, st.sampled_from(["bob", "carol"]), st.integers(0, 30)),
    st.tuples(st.just("forget"), st.integers(0, 30)),
    st.tuples(st.just("get"), keys)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 20), ops=operations)
def test_answers_as_an_ordered_dict_does(capacity: int, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    memory, model = IdMemory(capacity, WINDOW), Model(capacity)
    clock = 0
    for op in ops:
        if op[0] == "add":
            _, key, to, step = op
            clock += step
            memory.add(key, to, clock)
            model.add(key, to, clock)
        elif op[0] == "forget":
            memory.forget(clock + op[1] * 10)
            model.forget(clock + op[1] * 10)
        else:
            assert memory.get(op[1]) == model.get(op[1])
        assert len(memory) == len(model.ids)
    assert list(memory.items()) == [(key, to, ts) for key, (to, ts) in model.ids.items()]
    for key in model.ids:
        assert memory.get(key) == model.get(key)


def test_a_full_memory_forgets_the_oldest_in_order_and_keeps_the_newest() -> None:
    memory = IdMemory(1000, 10**9)
    pairs = [("alice", f"m{n}") for n in range(2500)]
    for n, (sender, msg_id) in enumerate(pairs):
        memory.add(id_key(sender, msg_id), "bob", n)
    assert len(memory) == 1000
    assert [ts for _, _, ts in memory.items()] == list(range(1500, 2500))
    assert all(memory.get(id_key(*pair)) is None for pair in pairs[:1500])
    assert all(memory.get(id_key(*pair)) == ("bob", n, n + 10**9)
               for n, pair in enumerate(pairs) if n >= 1500)


def test_keys_are_the_same_in_every_process_and_tell_sender_from_id() -> None:
    assert id_key("alice", "m1") == id_key("alice", "m1") == -5973941917152389249
    assert id_key("alice", "m1") != id_key("alice", "m2")
    assert id_key("ab", "c") != id_key("a", "bc")  # IDENTs hold no NUL, the separator


unread_operations = st.lists(st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 5), st.sampled_from(["al", "bo", "cy"])),
    st.tuples(st.just("trim"), st.integers(0, 60)),
    st.tuples(st.just("read"), st.integers(0, 400), st.sampled_from([None, "al", "bo"])),
    st.tuples(st.just("copy"))), max_size=200)


@settings(max_examples=300, deadline=None)
@given(ops=unread_operations)
def test_unread_keeps_what_an_ordered_dict_keeps(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    unread = Unread()
    model: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
    seq = 0
    for op in ops:
        if op[0] == "deliver":
            for _ in range(op[1]):
                seq += 1
                unread.append(seq, op[2], f"id-{seq}-\u00e9" if seq % 7 == 0 else f"i{seq}")
                model[seq] = (op[2], f"id-{seq}-\u00e9" if seq % 7 == 0 else f"i{seq}")
        elif op[0] == "trim":
            unread.trim(op[1])
            while len(model) > op[1]:
                model.popitem(last=False)
        elif op[0] == "read":
            _, upto, peer = op
            unread.mark_read(upto, peer)
            for key, (sender, _) in list(model.items()):
                if key <= upto and (peer is None or sender == peer):
                    del model[key]
        else:
            before = list(unread)
            copied = unread.copy()
            copied.mark_read(10**9, None)
            assert list(unread) == before and list(copied) == []
        assert list(unread) == [(key, sender, msg_id) for key, (sender, msg_id) in model.items()]
        assert len(unread) == len(model)
