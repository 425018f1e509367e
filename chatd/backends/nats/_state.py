"""State buckets on NATS: JetStream key-value buckets, one per declared bucket.

Bucket ``NAME`` is the KV bucket ``NS_NAME`` (stream ``KV_NS_NAME``, history 1), so
``nats kv`` tools can read it. Every bucket is file-backed, durable or not: the records of
a bucket that is not durable (the sessions) describe chatd processes, which outlive a
restart of the NATS servers, so they must outlive it too. A record's
revision is its stream sequence; compare-and-set is ``Nats-Expected-Last-Subject-Sequence``;
expiry is the per-message ``Nats-TTL``. Reads are direct gets, served by any replica.
A deleted key leaves a purge marker that itself expires after a minute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatd.backends._interfaces import Bucket, BucketSpec
from chatd.backends._records import RevisionMismatch, StoreUnavailable, Versioned

from ._jetstream import WRONG_LAST_SEQUENCE, JetStream, JetStreamError, header_int
from ._names import Names

__all__ = ["NatsBucket", "NatsState", "bucket_stream"]

#: Seconds a delete marker is kept.
MARKER_TTL = 60
_DELETED = ("DEL", "PURGE")


def bucket_stream(names: Names, spec: BucketSpec, replicas: int) -> dict[str, Any]:
    """The configuration of the KV stream behind ``spec``."""
    bucket = names.bucket(spec.name)
    return {"name": f"KV_{bucket}", "subjects": [f"$KV.{bucket}.>"],
            "description": spec.description, "retention": "limits",
            "storage": "file", "num_replicas": replicas,
            "max_msgs_per_subject": 1, "discard": "new", "allow_direct": True,
            "allow_rollup_hdrs": True, "deny_delete": True, "allow_msg_ttl": True}


def _ttl(ttl: float | None) -> dict[str, str]:
    if ttl is None:
        return {}
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, not {ttl}")
    return {"Nats-TTL": f"{max(1, round(ttl))}s"}


class NatsBucket:
    """One state bucket (see :class:`chatd.backends.Bucket`)."""

    def __init__(self, spec: BucketSpec, jetstream: JetStream, names: Names) -> None:
        self.spec = spec
        self._js = jetstream
        self._names = names
        self._stream = f"KV_{names.bucket(spec.name)}"

    async def get(self, key: str) -> Versioned | None:
        """The record of ``key``; see :meth:`chatd.backends.Bucket.get`."""
        reply = await self._js.get(self._stream,
                                   last_by_subj=self._names.key_subject(self.spec.name, key))
        if reply is None or reply.headers.get("KV-Operation") in _DELETED:
            return None
        return Versioned(key, reply.data, header_int(reply, "Nats-Sequence"))

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key``; see :meth:`chatd.backends.Bucket.put`."""
        return await self._write(key, value, _ttl(ttl))

    async def put_many(self, records: Sequence[tuple[str, bytes]], *,
                       ttl: float | None = None) -> list[int]:
        """Write several keys, the publishes sent at once; see
        :meth:`chatd.backends.Bucket.put_many`."""
        headers = _ttl(ttl) or None
        getters = self._js.publish_all([
            (self._names.key_subject(self.spec.name, key), value, headers)
            for key, value in records])
        try:
            return [(await get()).seq for get in getters]
        except JetStreamError as exc:
            raise StoreUnavailable(str(exc)) from None

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write ``key`` if absent; see :meth:`chatd.backends.Bucket.create`."""
        try:
            return await self._write(key, value, {
                **_ttl(ttl), "Nats-Expected-Last-Subject-Sequence": "0"})
        except RevisionMismatch:
            pass
        # A delete marker may hold the subject: the key is absent, so write over it.
        reply = await self._js.get(self._stream,
                                   last_by_subj=self._names.key_subject(self.spec.name, key))
        if reply is None or reply.headers.get("KV-Operation") not in _DELETED:
            raise RevisionMismatch(f"{self.spec.name}/{key} exists")
        return await self.update(key, value, header_int(reply, "Nats-Sequence"), ttl=ttl)

    async def update(self, key: str, value: bytes, revision: int, *,
                     ttl: float | None = None) -> int:
        """Write ``key`` at ``revision``; see :meth:`chatd.backends.Bucket.update`."""
        return await self._write(key, value, {
            **_ttl(ttl), "Nats-Expected-Last-Subject-Sequence": str(revision)})

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove ``key``; see :meth:`chatd.backends.Bucket.delete`."""
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub",
                   "Nats-TTL": f"{MARKER_TTL}s"}
        if revision is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
        await self._write(key, b"", headers)

    async def _write(self, key: str, value: bytes, headers: dict[str, str]) -> int:
        subject = self._names.key_subject(self.spec.name, key)
        try:
            ack = await self._js.publish(subject, value, headers or None)
        except JetStreamError as exc:
            if exc.code == WRONG_LAST_SEQUENCE:
                raise RevisionMismatch(f"{self.spec.name}/{key}: {exc.description}") from None
            raise StoreUnavailable(str(exc)) from None
        return ack.seq


class NatsState:
    """The state buckets of one namespace (see :class:`chatd.backends.State`)."""

    def __init__(self, jetstream: JetStream, names: Names) -> None:
        self._js = jetstream
        self._names = names
        self.buckets: dict[str, NatsBucket] = {}
        self.frozen = False

    def bucket(self, spec: BucketSpec) -> Bucket:
        """The bucket ``spec`` names; see :meth:`chatd.backends.State.bucket`."""
        bucket = self.buckets.get(spec.name)
        if bucket is None:
            if self.frozen:
                raise RuntimeError(f"bucket {spec.name!r} declared after the backend started")
            bucket = self.buckets[spec.name] = NatsBucket(spec, self._js, self._names)
        return bucket
