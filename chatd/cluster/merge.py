"""Merging two replicas of a user's queue, and the queue's form on the wire.

Replicas of a queue can differ after a node died or the network was cut: one missed the
items written while it was away, or has items the other never got (written just before it
died, never confirmed to their sender), or both sides numbered different items with the
same sequence number. :func:`merge_states` joins two such states into one, from which
both replicas are then set, so that:

- a message is dropped only if the user acknowledged it: on one side its id is *known*
  (that side stored it) and it is no longer pending there; any other message survives;
- a receipt has no such memory: one numbered under the other side's acknowledgement is
  taken as acknowledged. Where both sides numbered the queue alike (a replica that missed
  writes while it was away) that is what happened; where they numbered it independently
  (a split of the cluster into two groups) such a receipt may be lost;
- an item appears once: a message is identified by (sender, id), a receipt by its
  content, whatever sequence number each side gave it;
- numbers stay unique and the user never misses an item: an item whose number is taken
  by another, or lies under an acknowledgement the user made without having it, is
  renumbered after everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatd.store import Entry, Message, ReceiptItem, UserState

__all__ = ["EMPTY", "merge_states", "pack_entry", "pack_state", "unpack_entry",
           "unpack_state"]

#: The state of a user a replica knows nothing about.
EMPTY = UserState(0, 0, (), (), ())


def _identity(entry: Entry) -> tuple[Any, ...]:
    item = entry.item
    if isinstance(item, Message):
        return ("m", item.sender, item.id)
    return ("r", item.status, item.by, item.ids)


def _acknowledged(state: UserState) -> set[tuple[Any, ...]]:
    """The messages ``state``'s side stored and the user has acknowledged there."""
    pending = {_identity(entry) for entry in state.entries}
    known = {("m", sender, msg_id) for sender, msg_id, _ in state.known}
    return known - pending


def merge_states(leader: UserState, other: UserState) -> UserState:
    """Join the leader's state of a queue with another replica's.

    The leader's items keep their numbers where numbers clash. Merging a state into one
    that already holds everything in it changes nothing.
    """
    acked = max(leader.acked, other.acked)
    leader_done = _acknowledged(leader)
    other_done = _acknowledged(other)
    other_pending = {_identity(entry) for entry in other.entries}
    kept: dict[int, Entry] = {}
    moved: list[Entry] = []
    seen: set[tuple[Any, ...]] = set()
    for entry in leader.entries:
        key = _identity(entry)
        seen.add(key)
        if key in other_done or (key[0] == "r" and entry.seq <= other.acked
                                 and key not in other_pending):
            continue  # acknowledged on the other side
        if entry.seq <= other.acked:
            moved.append(entry)  # the user acknowledged past it without having it
        else:
            kept[entry.seq] = entry
    for entry in other.entries:
        key = _identity(entry)
        if key in seen:
            continue
        seen.add(key)
        if key in leader_done or (key[0] == "r" and entry.seq <= leader.acked):
            continue
        if entry.seq <= leader.acked or entry.seq in kept:
            moved.append(entry)
        else:
            kept[entry.seq] = entry
    top = max(leader.last_seq, other.last_seq, acked, *kept, 0)
    for entry in sorted(moved, key=lambda e: e.seq):
        top += 1
        kept[top] = Entry(top, entry.item)
    unread = {seq: (seq, sender, msg_id) for seq, sender, msg_id in other.unread}
    unread.update((seq, (seq, sender, msg_id)) for seq, sender, msg_id in leader.unread)
    known = {(sender, msg_id): ts for sender, msg_id, ts in other.known}
    known.update(((sender, msg_id), ts) for sender, msg_id, ts in leader.known)
    return UserState(top, acked, tuple(kept[seq] for seq in sorted(kept)),
                     tuple(unread[seq] for seq in sorted(unread)),
                     tuple((sender, msg_id, ts) for (sender, msg_id), ts in known.items()))


def pack_entry(entry: Entry) -> list[Any]:
    """An entry as a link frame carries it (the recipient is implied)."""
    item = entry.item
    if isinstance(item, Message):
        return [entry.seq, "m", item.id, item.sender, item.body, item.ts]
    return [entry.seq, "r", item.status, item.by, list(item.ids), item.ts]


def unpack_entry(user: str, fields: Sequence[Any]) -> Entry:
    """The entry of ``user``'s queue that :func:`pack_entry` packed.

    Raises:
        ValueError: The fields are not a packed entry.
    """
    match list(fields):
        case [int(seq), "m", str(msg_id), str(sender), str(body), int(ts)]:
            return Entry(seq, Message(msg_id, sender, user, body, ts))
        case [int(seq), "r", str(status), str(by), list(ids), int(ts)]:
            return Entry(seq, ReceiptItem(status, by, tuple(str(i) for i in ids), ts))
    raise ValueError("not a packed entry")


def pack_state(state: UserState) -> list[Any]:
    """A user's state as a link frame carries it."""
    return [state.last_seq, state.acked, [pack_entry(e) for e in state.entries],
            [list(u) for u in state.unread], [list(k) for k in state.known]]


def unpack_state(user: str, fields: Sequence[Any]) -> UserState:
    """The state of ``user`` that :func:`pack_state` packed.

    Raises:
        ValueError: The fields are not a packed state.
    """
    last_seq, acked, entries, unread, known = fields
    return UserState(int(last_seq), int(acked),
                     tuple(unpack_entry(user, e) for e in entries),
                     tuple((int(s), str(f), str(i)) for s, f, i in unread),
                     tuple((str(f), str(i), int(t)) for f, i, t in known))
