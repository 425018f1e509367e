"""Names on NATS: subjects, streams and buckets, and how items are encoded in them.

Everything chatd puts on NATS starts with its namespace (``nats_namespace``, default
``chatd``), so several deployments can share a NATS cluster:

=============================  ==============================================================
``NS.q.USER``                  USER's queue: messages and receipts (stream ``NS_queues``)
``NS.a.USER``                  USER's acknowledgement records (same stream)
``NS.i.SENDER.RECIPIENT``      ids of SENDER's messages that left RECIPIENT's queue, kept for
                               the dedup window (same stream)
``NS.d.USER``                  live traffic for USER's session: each queue item as the stream
                               republishes it, and signals (core NATS, not stored)
``NS.p.USER``                  USER's presence reports (core NATS)
``$KV.NS_BUCKET.KEY``          state buckets (stream ``KV_NS_BUCKET``)
object store ``NS_blobs``      blobs
=============================  ==============================================================

User ids and keys are IDENTs (printable ASCII); in a subject token or a key, every
character other than ``A-Z a-z 0-9 _ -`` is written ``=XX`` (its code in hex), so ``.``,
``*`` and ``>`` never reach a subject and the mapping is one to one.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import cbor2

from chatd.backends._records import Entry, Item, Message, ReceiptItem

__all__ = ["Names", "decode_item", "encode_item", "token"]

_PLAIN = re.compile(r"[A-Za-z0-9_-]*")
_ESCAPE = re.compile(r"[^A-Za-z0-9_-]")


@functools.lru_cache(maxsize=65536)
def token(text: str) -> str:
    """``text`` as one subject token (or KV key): ``=XX`` for any other character."""
    if _PLAIN.fullmatch(text):
        return text
    return _ESCAPE.sub(lambda m: f"={ord(m.group()):02X}", text)


class Names:
    """The subjects, streams and buckets of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        #: The stream of queues, acknowledgement records and remembered ids.
        self.stream = f"{namespace}_queues"
        #: The object store of blobs.
        self.objects = f"{namespace}_blobs"

    def queue(self, user: str) -> str:
        """The subject of ``user``'s queue."""
        return f"{self.namespace}.q.{token(user)}"

    def acks(self, user: str) -> str:
        """The subject of ``user``'s acknowledgement records."""
        return f"{self.namespace}.a.{token(user)}"

    def ids(self, sender: str, recipient: str) -> str:
        """The subject of the ids of ``sender``'s messages that left ``recipient``'s queue."""
        return f"{self.namespace}.i.{token(sender)}.{token(recipient)}"

    def deliver(self, user: str) -> str:
        """The subject of live traffic for ``user``'s session."""
        return f"{self.namespace}.d.{token(user)}"

    def presence(self, user: str) -> str:
        """The subject of ``user``'s presence reports."""
        return f"{self.namespace}.p.{token(user)}"

    def stream_subjects(self) -> list[str]:
        """What the queue stream stores."""
        ns = self.namespace
        return [f"{ns}.q.*", f"{ns}.a.*", f"{ns}.i.*.*"]

    def republish(self) -> dict[str, str]:
        """The stream's republish rule: every queue item, once stored, to its user's
        live subject."""
        ns = self.namespace
        return {"src": f"{ns}.q.*", "dest": f"{ns}.d.{{{{wildcard(1)}}}}"}

    def bucket(self, name: str) -> str:
        """The KV bucket of the state bucket ``name``."""
        return f"{self.namespace}_{name}"

    def key_subject(self, bucket: str, key: str) -> str:
        """The subject of ``key`` in state bucket ``bucket``."""
        return f"$KV.{self.bucket(bucket)}.{token(key)}"


def encode_item(item: Item) -> bytes:
    """A queue item as stored: ``["m", id, from, body, ts]`` or ``["r", status, by, ids,
    ts]`` (the recipient is the subject's user)."""
    if isinstance(item, Message):
        return cbor2.dumps(["m", item.id, item.sender, item.body, item.ts])
    return cbor2.dumps(["r", item.status, item.by, list(item.ids), item.ts])


def decode_item(user: str, data: bytes) -> Item:
    """The queue item of ``user`` stored as ``data``.

    Raises:
        ValueError: ``data`` is not an item.
    """
    fields: Any = cbor2.loads(data)
    match fields:
        case ["m", str(msg_id), str(sender), str(body), int(ts)]:
            return Message(msg_id, sender, user, body, ts)
        case ["r", str(status), str(by), list(ids), int(ts)]:
            return ReceiptItem(status, by, tuple(str(i) for i in ids), ts)
    raise ValueError(f"not a queue item: {fields!r}")


def entry_of(user: str, seq: int, data: bytes) -> Entry:
    """The entry of ``user``'s queue stored at ``seq`` as ``data``."""
    return Entry(seq, decode_item(user, data))
