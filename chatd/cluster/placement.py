"""Replica placement: which two nodes keep a user's queue, and which of them leads it.

Placement uses rendezvous (highest random weight) hashing: every member of the cluster
gets a score for a user, a hash of the member's name and the user's id, and the members
in descending order of score are the user's *ranking*. The first two are the user's
*owners*: the nodes that keep the queue while every member is up. Adding or removing a
member moves only the users whose top two change, about 2/N of them.

A node computes placement from the members it can reach: the *replicas* of a user are the
first two members of the ranking that are up (from this node's point of view), and the
first of them *leads* the queue (numbers its items and writes them to both). With one
owner down, the next member of the ranking takes its place (a hinted replica) until the
owner returns and the data moves back (:mod:`chatd.cluster.replicas`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

__all__ = ["Placement", "ranking"]

#: Users whose ranking a node remembers at most; past it, it starts again (a few MB).
RANKINGS_KEPT = 65536


def _score(member: str, user: str) -> bytes:
    return hashlib.blake2b(f"{member}\x00{user}".encode(), digest_size=8).digest()


def ranking(user: str, members: Iterable[str]) -> list[str]:
    """``members`` in rendezvous order for ``user``: the first two are its owners."""
    return sorted(members, key=lambda member: _score(member, user), reverse=True)


class Placement:
    """Placement as one node sees it.

    Args:
        node: This node's name.
        members: Every member of the cluster, this node included.
        is_up: Whether a peer is reachable now (this node always is).
    """

    def __init__(self, node: str, members: Iterable[str], is_up: Callable[[str], bool]) -> None:
        self.node = node
        self.members = tuple(sorted(set(members) | {node}))
        self._is_up = is_up
        self._rankings: dict[str, tuple[str, ...]] = {}

    def ranking(self, user: str) -> tuple[str, ...]:
        """``user``'s ranking over the members (remembered: it is asked for per message)."""
        found = self._rankings.get(user)
        if found is None:
            if len(self._rankings) >= RANKINGS_KEPT:
                self._rankings.clear()
            found = self._rankings[user] = tuple(ranking(user, self.members))
        return found

    def owners(self, user: str) -> list[str]:
        """The two nodes that keep ``user``'s queue while every member is up."""
        return list(self.ranking(user)[:2])

    def replicas(self, user: str) -> list[str]:
        """The first two reachable members of ``user``'s ranking; the first leads."""
        up: list[str] = []
        for member in self.ranking(user):
            if member == self.node or self._is_up(member):
                up.append(member)
                if len(up) == 2:
                    break
        return up
