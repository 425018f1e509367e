"""Properties of replica placement (:mod:`chatd.cluster.placement`), sans-IO.

Every node computes a user's placement on its own, so it must be a pure function of the
user and the member names: the same on every node and in every run, whatever order the
members are listed in. The properties checked:

- ``ranking`` is deterministic, independent of the order of the members, and a permutation
  of them; fixed vectors pin the hash, so nodes of different versions agree;
- ``owners`` are the first two of the ranking (``Placement.ranking``, remembered per user,
  is the ranking);
- ``replicas`` are the first two members of the ranking that are up, in ranking order; a
  peer that is down is skipped, this node never is (it is up to itself), and with every
  member up they are the owners;
- rendezvous hashing moves few queues: adding a fourth member to three changes a user's
  owners only by bringing in the new member (new owners minus the new member are old
  owners), which happens for the users the new member ranks first or second for, and
  removing a member changes only the owners of the users it owned.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.cluster import placement as placement_module
from chatd.cluster.placement import Placement, ranking

THREE = ("n1", "n2", "n3")
USERS = [f"user{i}" for i in range(2000)]

PROPERTIES = settings(max_examples=100, deadline=None, derandomize=True, database=None)

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
members_lists = st.lists(names, min_size=1, max_size=7, unique=True)


def up_only(*peers: str) -> Callable[[str], bool]:
    """An ``is_up`` for which only ``peers`` are reachable."""
    return lambda member: member in peers


# -- ranking and owners -------------------------------------------------------------------


@PROPERTIES
@given(names, members_lists, st.randoms(use_true_random=False))
def test_ranking_is_a_permutation_independent_of_member_order(
        user: str, members: list[str], rnd: random.Random) -> None:
    ranked = ranking(user, members)
    assert sorted(ranked) == sorted(members), "ranking is not a permutation of the members"
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert ranking(user, shuffled) == ranked, "ranking depends on the members' order"
    assert ranking(user, iter(members)) == ranked, "ranking of an iterable differs"
    assert ranking(user, tuple(members)) == ranked


def test_ranking_is_the_same_on_every_node_and_in_every_version() -> None:
    # Fixed vectors: a change of the hash would move every queue when nodes upgrade.
    members = ["n1", "n2", "n3", "n4"]
    assert ranking("alice", members) == ["n4", "n3", "n1", "n2"]
    assert ranking("bob", members) == ["n3", "n2", "n4", "n1"]
    assert ranking("carol", members) == ["n2", "n1", "n3", "n4"]
    assert ranking("dave", members) == ["n1", "n2", "n4", "n3"]


def test_users_spread_evenly_over_the_members() -> None:
    # Rendezvous hashing spreads users: every member owns about 2/3 of them out of three.
    owned = Counter(member for user in USERS for member in ranking(user, THREE)[:2])
    assert set(owned) == set(THREE)
    for member, count in owned.items():
        assert abs(count - len(USERS) * 2 / 3) < len(USERS) * 0.05, (
            f"{member} owns {count} of {len(USERS)} users")
    leaders = Counter(ranking(user, THREE)[0] for user in USERS)
    assert all(abs(count - len(USERS) / 3) < len(USERS) * 0.05 for count in leaders.values())


@PROPERTIES
@given(names, members_lists)
def test_owners_are_the_first_two_of_the_ranking(user: str, members: list[str]) -> None:
    for node in members:
        placement = Placement(node, members, up_only())
        assert placement.owners(user) == ranking(user, members)[:2]


def test_this_node_is_a_member_even_if_not_listed() -> None:
    placement = Placement("n9", THREE, up_only(*THREE))
    assert placement.members == tuple(sorted((*THREE, "n9")))
    for user in USERS[:200]:
        assert placement.owners(user) == ranking(user, [*THREE, "n9"])[:2]


# -- replicas -----------------------------------------------------------------------------


@PROPERTIES
@given(names, members_lists, st.data())
def test_replicas_are_the_first_two_members_up_and_this_node_always_counts(
        user: str, members: list[str], data: st.DataObject) -> None:
    node = data.draw(st.sampled_from(members), label="this node")
    up = set(data.draw(st.lists(st.sampled_from(members), unique=True), label="peers up"))
    # this node answers for itself whatever is_up says about it
    placement = Placement(node, members, lambda member: member in up and member != node)
    replicas = placement.replicas(user)
    ranked = ranking(user, members)
    reachable = [m for m in ranked if m in up or m == node]
    assert replicas == reachable[:2]
    assert all(m == node or m in up for m in replicas), "a down peer was made a replica"
    assert replicas == sorted(replicas, key=ranked.index), "replicas out of ranking order"
    assert len(replicas) == min(2, len(reachable))
    if node in ranked[:2]:
        assert node in replicas, "an owner that is up (this node) lost its replica"
    for member in ranked:  # every member ranked before a replica is down
        if member in replicas:
            break
        assert member not in up and member != node, f"{member} is up yet skipped"


@PROPERTIES
@given(names, members_lists)
def test_with_every_member_up_replicas_are_the_owners(user: str, members: list[str]) -> None:
    for node in members:
        placement = Placement(node, members, up_only(*members))
        assert placement.replicas(user) == placement.owners(user)


@pytest.mark.parametrize("down", THREE)
def test_one_owner_down_hands_its_place_to_the_next_in_ranking(down: str) -> None:
    members = [*THREE, "n4"]
    for user in USERS[:500]:
        ranked = ranking(user, members)
        for node in (m for m in members if m != down):
            peers = [m for m in members if m not in (down, node)]
            replicas = Placement(node, members, up_only(*peers)).replicas(user)
            assert replicas == [m for m in ranked if m != down][:2]
            if down in ranked[:2]:  # the other owner leads, the third member stands in
                assert replicas == [m for m in ranked[:3] if m != down]


def test_alone_a_node_is_the_only_replica_of_every_user() -> None:
    for user in USERS[:200]:
        assert Placement("n1", THREE, up_only()).replicas(user) == ["n1"]


def test_replicas_follow_peers_going_down_and_up() -> None:
    up = set(THREE)
    placement = Placement("n1", THREE, lambda member: member in up)
    for user in USERS[:300]:
        ranked = ranking(user, THREE)
        assert placement.replicas(user) == ranked[:2]
        up.discard("n2")
        assert placement.replicas(user) == [m for m in ranked if m != "n2"][:2]
        up.discard("n3")
        assert placement.replicas(user) == ["n1"]
        up.update(THREE)
        assert placement.replicas(user) == ranked[:2], "a peer back up got no queues back"


def test_remembered_rankings_are_the_rankings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement_module, "RANKINGS_KEPT", 50)
    placement = Placement("n1", [*THREE, "n4"], up_only("n2", "n3", "n4"))
    for _ in range(2):  # the second pass asks again, past the memory's limit
        for user in USERS[:300]:
            expected = ranking(user, [*THREE, "n4"])
            assert list(placement.ranking(user)) == expected
            assert placement.owners(user) == placement.replicas(user) == expected[:2]


# -- membership changes ---------------------------------------------------------------------


def test_adding_a_fourth_member_moves_only_the_users_it_ranks_first_or_second() -> None:
    moved = 0
    for user in USERS:
        old = set(ranking(user, THREE)[:2])
        new = set(ranking(user, [*THREE, "n4"])[:2])
        assert new - {"n4"} <= old, f"{user} moved from {old} to {new}, not only to n4"
        assert (new != old) == ("n4" in new), f"{user}: owners changed without n4"
        moved += new != old
        # The members already there keep their order between themselves.
        assert [m for m in ranking(user, [*THREE, "n4"]) if m != "n4"] == ranking(user, THREE)
    # Each user's new top two hold n4 with probability 2/4: about half move, never all.
    assert 0.4 * len(USERS) < moved < 0.6 * len(USERS), f"{moved} of {len(USERS)} moved"


@pytest.mark.parametrize("removed", THREE)
def test_removing_a_member_changes_only_the_users_it_owned(removed: str) -> None:
    members = [*THREE, "n4"]
    changed = 0
    for user in USERS:
        ranked = ranking(user, members)
        old = ranked[:2]
        new = ranking(user, [m for m in members if m != removed])[:2]
        if removed in old:
            changed += 1
            assert new == [m for m in ranked if m != removed][:2], (
                f"{user}: {removed}'s place should go to the next member in its ranking")
        else:
            assert new == old, f"{user} moved though {removed} did not own it"
    assert 0.4 * len(USERS) < changed < 0.6 * len(USERS)


@PROPERTIES
@given(names, members_lists, names)
def test_membership_change_keeps_the_order_of_the_others(user: str, members: list[str],
                                                          extra: str) -> None:
    others = [m for m in members if m != extra]
    assert [m for m in ranking(user, [*others, extra]) if m != extra] == ranking(user, others)
