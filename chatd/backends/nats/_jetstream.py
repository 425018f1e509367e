"""The JetStream API, as chatd uses it, over the bridge (trio; no asyncio here).

Publishing to a stream is a request answered by a JSON acknowledgement; reads are direct
gets (``$JS.API.DIRECT.GET``), one message or a batch ended by a status message; streams
are managed with the JSON API (``$JS.API.STREAM.*``). Errors come back as JSON with a
numeric ``err_code``; the ones chatd acts on are named here. The publishes of messages
are counted in a :class:`PublishStats`: how long each took to be acknowledged, and why
those that failed did.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from chatd.backends._records import StoreUnavailable
from chatd.metrics import Histogram

from ._bridge import NatsBridge, NatsUnavailable, Reply

__all__ = ["PUBLISH_ERRORS", "WRONG_LAST_SEQUENCE", "JetStream", "JetStreamError", "PubAck",
           "PublishStats"]

#: ``Nats-Expected-Last-Subject-Sequence`` did not hold.
WRONG_LAST_SEQUENCE = 10071
#: The stream does not exist.
STREAM_NOT_FOUND = 10059
#: No message matches a get.
NO_MESSAGE = 10037
#: Why a publish failed (docs/operations.md, ``chatd_nats_publish_errors_total``): no
#: connection or it broke before the answer; no answer within ``nats_timeout``; nothing
#: listens on the subject (no stream, or no leader); JetStream answered with an error (a
#: failed expectation, a limit); anything else.
PUBLISH_ERRORS = ("disconnected", "timeout", "no_responders", "refused", "other")


class JetStreamError(Exception):
    """JetStream refused a request: its ``err_code`` and description."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} ({code})")
        self.code = code
        self.description = description


class PubAck(NamedTuple):
    """A stored message's stream sequence, and whether it was a duplicate (then the
    sequence is the original's)."""

    seq: int
    duplicate: bool


class PublishStats:
    """Publishes counted as they end: the time each acknowledged one took (from being
    handed to the connection to JetStream's acknowledgement arriving), and the failed ones
    by reason (one of :data:`PUBLISH_ERRORS`)."""

    __slots__ = ("errors", "seconds")

    def __init__(self) -> None:
        self.seconds = Histogram()
        self.errors = dict.fromkeys(PUBLISH_ERRORS, 0)

    def failed(self, exc: Exception, count: int = 1) -> None:
        """Count ``count`` publishes that failed with ``exc``."""
        if isinstance(exc, JetStreamError):
            reason = "refused"
        elif isinstance(exc, NatsUnavailable):
            reason = exc.reason
        else:
            reason = "other"
        self.errors[reason] += count


def _pub_ack(reply: Reply) -> PubAck:
    if reply.status:
        raise NatsUnavailable(f"JetStream did not store the message (status {reply.status})",
                              "no_responders" if reply.status == "503" else "other")
    body = json.loads(reply.data)
    error = body.get("error")
    if error is not None:
        raise JetStreamError(int(error.get("err_code", 0)), str(error.get("description")))
    return PubAck(int(body["seq"]), bool(body.get("duplicate", False)))


class JetStream:
    """JetStream requests for one stream-using service.

    Args:
        bridge: The NATS connection.
    """

    def __init__(self, bridge: NatsBridge) -> None:
        self.bridge = bridge

    async def publish(self, subject: str, payload: bytes,
                      headers: dict[str, str] | None = None) -> PubAck:
        """Store a message; its acknowledgement.

        Raises:
            JetStreamError: JetStream refused it (a failed expectation, say).
            StoreUnavailable: No stream answered, or NATS did not.
        """
        return _pub_ack(await self.bridge.request(subject, payload, headers))

    def publish_all(self, messages: Sequence[tuple[str, bytes, dict[str, str] | None]], *,
                    stats: PublishStats | None = None) -> list[Callable[[], Any]]:
        """Store several messages, sent at once in order; one awaitable getter each,
        returning the :class:`PubAck` or raising as :meth:`publish` does.

        Args:
            messages: (subject, payload, headers) of each.
            stats: Where to count each publish once it ends (a getter never awaited, its
                caller cancelled, counts nothing).

        Raises:
            StoreUnavailable: There is no connection to NATS: none was sent.
        """
        try:
            getters = self.bridge.request_all(messages)
        except StoreUnavailable as exc:
            if stats is not None:
                stats.failed(exc, len(messages))
            raise

        def acked(getter: Callable[[], Any]) -> Callable[[], Any]:
            async def get() -> PubAck:
                try:
                    replies, seconds = await getter()
                    ack = _pub_ack(replies[0])
                except (StoreUnavailable, JetStreamError) as exc:
                    if stats is not None:
                        stats.failed(exc)
                    raise
                if stats is not None:
                    stats.seconds.observe(seconds)
                return ack
            return get

        return [acked(getter) for getter in getters]

    async def get(self, stream: str, **query: Any) -> Reply | None:
        """One message by a direct get (``seq``, ``last_by_subj``, ``next_by_subj``...),
        or None if there is none.

        Raises:
            StoreUnavailable: NATS did not answer, or the stream refused.
        """
        reply = await self.bridge.request(f"$JS.API.DIRECT.GET.{stream}",
                                          json.dumps(query).encode())
        if reply.status == "404":
            return None
        if reply.status:
            raise StoreUnavailable(f"direct get from {stream} failed (status {reply.status})")
        return reply

    async def get_batch(self, stream: str, subject: str, after: int, limit: int
                        ) -> list[Reply]:
        """Up to ``limit`` messages on ``subject`` with sequence above ``after``, in order.

        Raises:
            StoreUnavailable: NATS did not answer, or the stream refused.
        """
        query = {"next_by_subj": subject, "seq": after + 1, "batch": limit}
        replies = await self.bridge.request_many(f"$JS.API.DIRECT.GET.{stream}",
                                                 json.dumps(query).encode())
        end = replies[-1].status if replies else ""
        if end not in ("204", "404"):
            raise StoreUnavailable(f"direct get from {stream} failed (status {end})")
        return [reply for reply in replies if not reply.status]

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JetStream API call (``STREAM.INFO.NAME``...); its JSON answer.

        Raises:
            JetStreamError: JetStream refused it.
            StoreUnavailable: NATS did not answer (or JetStream is not enabled).
        """
        reply = await self.bridge.request(f"$JS.API.{subject}",
                                          json.dumps(body or {}).encode())
        if reply.status:
            raise StoreUnavailable(f"JetStream did not answer {subject} (status "
                                   f"{reply.status}): is JetStream enabled on the server?")
        answer: dict[str, Any] = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            raise JetStreamError(int(error.get("err_code", 0)), str(error.get("description")))
        return answer

    async def purge(self, stream: str, subject: str, below: int) -> None:
        """Remove the messages on ``subject`` with sequence below ``below``."""
        await self.api(f"STREAM.PURGE.{stream}", {"filter": subject, "seq": below})

    async def ensure_stream(self, config: dict[str, Any], *, keep: Sequence[str] = ()) -> str:
        """Create the stream ``config`` describes, or update it to that configuration
        (but for the settings named in ``keep``, which an existing stream keeps).

        Returns:
            ``created``, ``updated`` or ``unchanged``.

        Raises:
            JetStreamError: JetStream refused the configuration.
        """
        name = config["name"]
        try:
            info = await self.api(f"STREAM.INFO.{name}")
        except JetStreamError as exc:
            if exc.code != STREAM_NOT_FOUND:
                raise
            await self.api(f"STREAM.CREATE.{name}", config)
            return "created"
        current = info["config"]
        wanted = {key: value for key, value in config.items() if key not in keep}
        if all(current.get(key) == value for key, value in wanted.items()):
            return "unchanged"
        await self.api(f"STREAM.UPDATE.{name}", {**current, **wanted})
        return "updated"

    async def get_from_leader(self, stream: str, **query: Any) -> tuple[str, int, bytes] | None:
        """One message read by the stream's leader (``seq``, ``next_by_subj``...): its
        subject, sequence and data, or None if there is none. Slower than a direct get,
        which any replica answers, but never behind.

        Raises:
            StoreUnavailable: NATS did not answer, or the stream refused.
        """
        try:
            answer = await self.api(f"STREAM.MSG.GET.{stream}", query)
        except JetStreamError as exc:
            if exc.code == NO_MESSAGE:
                return None
            raise StoreUnavailable(str(exc)) from None
        message = answer["message"]
        return (str(message["subject"]), int(message["seq"]),
                base64.b64decode(message.get("data") or ""))


def header_int(reply: Reply, name: str) -> int:
    """An integer header of a stored message (``Nats-Sequence``...)."""
    return int(reply.headers[name])
