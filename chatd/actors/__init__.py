"""The actor runtime: addresses, bounded mailboxes and supervisors.

An actor is an async function that owns its state and is reached only through its
:class:`Mailbox` (found by :class:`Address` in the node's :class:`ActorTable`) or through
small helpers in its own module. Supervisors start actors from declared child specs and
restart them by the one_for_one rules.
"""

from ._mailbox import ActorTable, Address, Mailbox
from ._supervisor import ChildSpec, Restart, RestartIntensityExceeded, Supervisor

__all__ = [
    "ActorTable",
    "Address",
    "ChildSpec",
    "Mailbox",
    "Restart",
    "RestartIntensityExceeded",
    "Supervisor",
]
