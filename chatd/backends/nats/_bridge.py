"""The bridge to NATS: nats-py, an asyncio library, run under trio through trio-asyncio.

This is the only module of chatd that touches asyncio. Everything else sees
:class:`NatsBridge`, a trio object with a small API: :meth:`~NatsBridge.publish`,
:meth:`~NatsBridge.request` (one reply), :meth:`~NatsBridge.request_many` (replies until a
status message, as JetStream's batched direct get sends them), subscriptions with a plain
function as handler, and the object store.

How a call crosses over: the trio side appends a command to a deque and, if the asyncio
side is not already awake, schedules one wake-up on the loop; a single asyncio task (the
writer) drains the deque in order and hands each command to nats-py. Replies come back on
one wildcard subscription of this connection's own inbox, whose callback (running in the
asyncio loop, which trio-asyncio runs inside trio) sets the trio waiter of the request.
So a request costs an append, a reply lookup and one trio wake-up, and commands reach the
server in the order they were made: a subscription made before a read is in force when
the read is served.

Failure: while the connection is down, every call fails at once with
:class:`NatsUnavailable`, a :class:`StoreUnavailable` that says why (nats-py's reconnect
buffer is off, so nothing is sent late), and requests in flight when it broke fail too; a
request without an answer within ``nats_timeout`` fails the same way. nats-py reconnects
by itself, forever; once it has, the ``on_reconnect`` hook runs, so that the bus can tell
sessions to read their queues again (live traffic sent meanwhile is lost). The first
connection must succeed within ``nats_timeout`` (or fail on bad credentials at once):
otherwise :class:`BackendUnavailable` says why, in one line.

The module is over 500 lines on purpose: it is the one place asyncio and nats-py may
appear, so every call that needs them (the object store's too) lives here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import itertools
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, cast

import nats
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from chatd.backends._records import BackendUnavailable, BlobInfo, BlobNotFound, StoreUnavailable
from chatd.config import Config
from chatd.logs import EventLog

__all__ = ["NatsBridge", "NatsUnavailable", "Reply", "Subscribed"]

logger = logging.getLogger(__name__)

#: Seconds between the client's pings, and unanswered pings before the connection is
#: taken as lost: a dead server is noticed within about 3 x this.
PING_INTERVAL = 2
MAX_OUTSTANDING_PINGS = 2
#: nats-py's errors that mean the connection is closed or reconnecting.
_CONNECTION_ERRORS = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                      nats.errors.OutboundBufferLimitError, OSError)


class NatsUnavailable(StoreUnavailable):
    """NATS did not do what was asked, and why, for the publish error counts.

    Args:
        message: What happened, for logs and answers.
        reason: ``disconnected`` (no connection, or it broke before the answer),
            ``timeout`` (no answer within ``nats_timeout``), ``no_responders`` (nothing
            listens on the subject: no stream, or none with a leader) or ``other``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Reply(NamedTuple):
    """A message from NATS as the trio side sees it."""

    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def status(self) -> str:
        """The status of a status message (``"404"``, ``"204"``...), or ""."""
        return self.headers.get("Status", "")


class Subscribed:
    """A subscription made through the bridge (see :meth:`NatsBridge.subscribe`)."""

    __slots__ = ("handler", "sub", "subject")

    def __init__(self, subject: str, handler: Callable[[Reply], None]) -> None:
        self.subject = subject
        self.handler = handler
        self.sub: Subscription | None = None


class _Waiter:
    __slots__ = ("answered", "deadline", "done", "error", "many", "reason", "replies", "sent",
                 "timed")

    def __init__(self, many: bool, timeout: float, timed: bool) -> None:
        self.sent = trio.current_time()  # when the request is sent
        self.deadline = self.sent + timeout
        self.done = trio.Event()
        self.many = many
        self.timed = timed  # whether to note when the answer arrived
        self.answered = 0.0
        self.replies: list[Reply] = []
        self.error: str | None = None
        self.reason = ""  # NatsUnavailable's, with the error


def _reply(msg: Msg) -> Reply:
    return Reply(msg.subject, msg.data, msg.headers or {})


class NatsBridge:
    """One NATS connection, used from trio.

    Args:
        config: ``nats`` URLs, credentials, TLS, ``nats_timeout``.
        log: Where connection events are logged.
    """

    def __init__(self, config: Config, log: EventLog) -> None:
        self._config = config
        self._log = log
        self._loop: Any = None
        self._nc: Client | None = None
        self._connected = False
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._kicked = False
        self._waiters: dict[str, _Waiter] = {}
        self._tokens = itertools.count(1)
        self._inbox = ""
        self._first_error: str | None = None
        self._refused = trio.Event()
        #: Runs (in trio) after the connection came back: live traffic may have been lost.
        self.on_reconnect: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up."""
        return self._connected

    @property
    def cluster_size(self) -> int:
        """How many servers the client knows of: those configured and those the servers
        told it about, each counted once."""
        assert self._nc is not None
        return len({(url.hostname, url.port) for url in self._nc.servers})

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts, in bytes."""
        assert self._nc is not None
        return int(self._nc.max_payload)

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[NatsBridge] = (
            trio.TASK_STATUS_IGNORED)) -> None:
        """Connect, serve until cancelled, then close the connection.

        Raises:
            BackendUnavailable: The first connection failed (the reason in one line).
        """
        async with trio_asyncio.open_loop() as loop:
            self._loop = loop
            nc = self._nc = Client()
            writer: asyncio.Task[None] | None = None
            await self._connect(nc)  # closes what it opened if it fails
            try:
                self._inbox = nc.new_inbox()
                await trio_asyncio.aio_as_trio(nc.subscribe)(f"{self._inbox}.*",
                                                             cb=self._on_reply)
                writer = loop.create_task(self._writer())
                self._connected = True
                self._log.info("nats_connected", url=_url(nc), servers=self.cluster_size)
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._connected = False
                self._fail_all("the NATS connection was closed")
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    if writer is not None:
                        writer.cancel()
                    await trio_asyncio.aio_as_trio(nc.close)()

    async def _connect(self, nc: Client) -> None:
        config = self._config
        try:
            credentials = _credentials(config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BackendUnavailable(f"cannot use the NATS credentials or TLS files: "
                                     f"{exc}") from None
        options: dict[str, Any] = dict(
            servers=list(config.nats), name=config.node, connect_timeout=config.nats_timeout,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            pending_size=0, error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected)
        options.update(credentials)
        with trio.move_on_after(config.nats_timeout) as deadline:
            async with trio.open_nursery() as nursery:
                async def refused() -> None:
                    await self._refused.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(refused)
                await trio_asyncio.aio_as_trio(nc.connect)(**options)
                nursery.cancel_scope.cancel()
        if deadline.cancelled_caught or self._refused.is_set() or not nc.is_connected:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await trio_asyncio.aio_as_trio(nc.close)()
            urls = ", ".join(config.nats)
            if self._refused.is_set():
                raise BackendUnavailable(f"NATS at {urls} refused the credentials: "
                                         f"{self._first_error}")
            cause = self._first_error or "no answer"
            raise BackendUnavailable(f"cannot reach NATS at {urls} within "
                                     f"{config.nats_timeout:g} s: {cause}")
        if "tls" in credentials and not nc._server_info.get("tls_required"):
            # nats-py speaks TLS only to a server that requires it, whatever the URL says:
            # TLS was asked for, so a server that does not is refused.
            url = _url(nc)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await trio_asyncio.aio_as_trio(nc.close)()
            raise BackendUnavailable(f"NATS at {url} does not require TLS, which the "
                                     "configuration asks for (tls:// or nats_tls_*)")

    # -- calls from trio -----------------------------------------------------------------

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None
                ) -> None:
        """Send a message without waiting for anything.

        Raises:
            StoreUnavailable: The connection is down.
        """
        self._check()
        self._push(("pub", subject, payload, headers, "", None))

    async def request(self, subject: str, payload: bytes,
                      headers: dict[str, str] | None = None) -> Reply:
        """Send a request and return its reply.

        Raises:
            StoreUnavailable: The connection is down or broke, or no reply came in time.
        """
        replies = await self._request(subject, payload, headers, many=False)
        return replies[0]

    async def request_many(self, subject: str, payload: bytes) -> list[Reply]:
        """Send a request answered by several messages, ended by a status message (which
        is the last one returned).

        Raises:
            StoreUnavailable: As for :meth:`request`.
        """
        return await self._request(subject, payload, None, many=True)

    def request_all(self, requests: Iterable[tuple[str, bytes, dict[str, str] | None]]
                    ) -> list[Callable[[], Any]]:
        """Send several requests at once, in order; returns one awaitable getter each.

        Each getter returns ``([reply], seconds)``, the seconds from the request being sent
        to its reply arriving (the publish latency, at the cost of one clock read), or
        raises :class:`NatsUnavailable` as :meth:`request` would. Waiting on them in turn
        costs one round trip for all: every request's deadline runs from when it was sent.
        """
        self._check()
        return [functools.partial(self._await_timed,
                                  *self._send(subject, payload, headers, False, True))
                for subject, payload, headers in requests]

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                       *, many: bool) -> list[Reply]:
        self._check()
        return await self._await(*self._send(subject, payload, headers, many, False))

    def _send(self, subject: str, payload: bytes, headers: dict[str, str] | None,
              many: bool, timed: bool) -> tuple[str, _Waiter]:
        """Queue a request with a reply subject of its own; its token and waiter."""
        token = str(next(self._tokens))
        waiter = self._waiters[token] = _Waiter(many, self._config.nats_timeout, timed)
        self._push(("pub", subject, payload, headers, f"{self._inbox}.{token}", token))
        return token, waiter

    async def _await(self, token: str, waiter: _Waiter) -> list[Reply]:
        try:
            with trio.move_on_at(waiter.deadline):
                await waiter.done.wait()
        finally:  # answered, timed out or cancelled: a late reply finds nobody waiting
            self._waiters.pop(token, None)
        if waiter.error is not None:
            raise NatsUnavailable(waiter.error, waiter.reason)
        if not waiter.done.is_set():
            raise NatsUnavailable(f"NATS did not answer within {self._config.nats_timeout:g} s",
                                  "timeout")
        return waiter.replies

    async def _await_timed(self, token: str, waiter: _Waiter) -> tuple[list[Reply], float]:
        replies = await self._await(token, waiter)
        return replies, waiter.answered - waiter.sent

    def subscribe(self, subject: str, handler: Callable[[Reply], None]) -> Subscribed:
        """Call ``handler`` (in trio, never awaited) with every message on ``subject``.

        The subscription is in force for every request made after this call.

        Raises:
            StoreUnavailable: The connection is down.
        """
        self._check()
        subscribed = Subscribed(subject, handler)
        self._push(("sub", subscribed))
        return subscribed

    def unsubscribe(self, subscribed: Subscribed) -> None:
        """End a subscription (quietly if the connection is down)."""
        if self._connected:
            self._push(("unsub", subscribed))

    async def ensure_object_store(self, bucket: str, replicas: int) -> None:
        """Create the object store ``bucket`` unless it exists.

        Raises:
            StoreUnavailable: NATS refused or did not answer.
        """
        async def create(nc: Client) -> None:
            js = nc.jetstream(timeout=self._config.nats_timeout)
            try:
                await js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                await js.create_object_store(
                    bucket, nats.js.api.ObjectStoreConfig(bucket=bucket, replicas=replicas,
                                                          storage=nats.js.api.StorageType.FILE))

        await self._call(create)

    async def object_put(self, bucket: str, name: str, source: Path) -> BlobInfo:
        """Store the file ``source`` as object ``name``; its size and SHA-256 (hex)."""
        async def put(nc: Client) -> BlobInfo:
            store = await nc.jetstream(timeout=self._config.nats_timeout).object_store(bucket)
            with open(source, "rb") as file:
                info = await store.put(name, file)
            return BlobInfo(name, int(info.size or 0), _digest(info.digest))

        return cast(BlobInfo, await self._call(put))

    async def object_get(self, bucket: str, name: str, target: Path) -> None:
        """Write object ``name`` to the file ``target``.

        Raises:
            BlobNotFound: There is no such object.
        """
        async def get(nc: Client) -> None:
            store = await nc.jetstream(timeout=self._config.nats_timeout).object_store(bucket)
            with open(target, "wb") as file:
                try:
                    await store.get(name, writeinto=file)
                except nats.js.errors.ObjectNotFoundError:
                    raise BlobNotFound(name) from None

        await self._call(get)

    async def object_info(self, bucket: str, name: str) -> BlobInfo | None:
        """Object ``name``'s size and SHA-256, or None if there is none."""
        async def info(nc: Client) -> BlobInfo | None:
            store = await nc.jetstream(timeout=self._config.nats_timeout).object_store(bucket)
            try:
                found = await store.get_info(name)
            except nats.js.errors.ObjectNotFoundError:
                return None
            return BlobInfo(name, int(found.size or 0), _digest(found.digest))

        return cast("BlobInfo | None", await self._call(info))

    async def object_delete(self, bucket: str, name: str) -> bool:
        """Remove object ``name``; whether there was one."""
        async def delete(nc: Client) -> bool:
            store = await nc.jetstream(timeout=self._config.nats_timeout).object_store(bucket)
            try:
                await store.delete(name)
            except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
                return False
            return True

        return bool(await self._call(delete))

    async def _call(self, work: Callable[[Client], Any]) -> Any:
        """Run the asyncio coroutine function ``work(client)`` (object store calls)."""
        self._check()
        assert self._nc is not None
        try:
            # The loop, not the context: callers run in trio tasks outside open_loop().
            return await self._loop.run_aio_coroutine(work(self._nc))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise StoreUnavailable(f"NATS object store: {exc or type(exc).__name__}") from exc

    # -- internals ------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._connected:
            raise NatsUnavailable("no connection to NATS", "disconnected")

    def _push(self, command: tuple[Any, ...]) -> None:
        self._commands.append(command)
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:  # in the asyncio loop
        if self._wake is not None:
            self._wake.set()

    async def _writer(self) -> None:
        """Hand every queued command to nats-py, in order (an asyncio task)."""
        self._wake = asyncio.Event()
        nc = self._nc
        assert nc is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._kicked = False
            commands = self._commands
            while commands:
                command = commands.popleft()
                try:
                    match command:
                        case ("pub", subject, payload, headers, reply, _):
                            await nc.publish(subject, payload, reply=reply, headers=headers)
                        case ("sub", subscribed):
                            subscribed.sub = await nc.subscribe(
                                subscribed.subject, cb=self._handler(subscribed))
                        case ("unsub", subscribed):
                            if subscribed.sub is not None:
                                await subscribed.sub.unsubscribe()
                except (nats.errors.Error, OSError) as exc:
                    if command[0] == "pub" and command[5] is not None:
                        self._fail(command[5], f"NATS refused the request: {exc!r}",
                                   "disconnected" if isinstance(exc, _CONNECTION_ERRORS)
                                   else "other")
                    elif command[0] == "sub":
                        self._log.warning("nats_subscribe_failed", subject=command[1].subject,
                                          reason=repr(exc))

    def _handler(self, subscribed: Subscribed) -> Callable[[Msg], Any]:
        handler, log = subscribed.handler, self._log

        async def on_message(msg: Msg) -> None:
            try:
                handler(_reply(msg))
            except Exception:
                # The handler's failure is the handler's (a session, presence): it must not
                # end this subscription or the bridge.
                log.error("bus_handler_failed", error="bus_handler_failed", exc_info=True,
                          subject=msg.subject)

        return on_message

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1:]
        waiter = self._waiters.get(token)
        if waiter is None:
            return
        reply = _reply(msg)
        waiter.replies.append(reply)
        if not waiter.many or reply.status:
            if waiter.timed:
                waiter.answered = trio.current_time()
            del self._waiters[token]
            waiter.done.set()

    def _fail(self, token: str, error: str, reason: str) -> None:
        waiter = self._waiters.pop(token, None)
        if waiter is not None:
            waiter.error = error
            waiter.reason = reason
            waiter.done.set()

    def _fail_all(self, error: str) -> None:
        for token in list(self._waiters):
            self._fail(token, error, "disconnected")

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if self._first_error is None:
            self._first_error = text
        lowered = text.lower()
        if not self._connected and ("authorization" in lowered
                                    or "authentication" in lowered):
            self._first_error = text
            self._refused.set()
        elif self._connected:
            self._log.warning("nats_error", reason=text)

    async def _on_disconnected(self) -> None:
        if self._connected:
            self._connected = False
            self._fail_all("the connection to NATS broke")
            self._log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        assert self._nc is not None
        self._connected = True
        self._log.info("nats_reconnected", url=_url(self._nc))
        if self.on_reconnect is not None:
            self.on_reconnect()


def _url(nc: Client) -> str:
    url = nc.connected_url
    return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else ""


def _digest(digest: str | None) -> str:
    """nats-py's ``SHA-256=<base64url>`` as hex."""
    if not digest:
        return ""
    encoded = digest.split("=", 1)[1] if digest.upper().startswith("SHA-256=") else digest
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()


def _credentials(config: Config) -> dict[str, Any]:
    """nats-py's options for the configured credentials and TLS.

    Raises:
        OSError: A credentials, key or certificate file cannot be read.
        ssl.SSLError: A certificate or key is not usable.
    """
    options: dict[str, Any] = {}
    for path in (config.nats_creds, config.nats_nkey, config.nats_tls_ca,
                 config.nats_tls_cert, config.nats_tls_key):
        if path is not None:
            path.read_bytes()  # read by nats-py or ssl later, whose errors name no file
    if config.nats_user is not None:
        options["user"] = config.nats_user
        options["password"] = config.nats_password or ""
    if config.nats_token is not None:
        options["token"] = config.nats_token
    if config.nats_creds is not None:
        options["user_credentials"] = str(config.nats_creds)
    if config.nats_nkey is not None:
        options["nkeys_seed"] = str(config.nats_nkey)
    tls = config.nats_tls_ca is not None or config.nats_tls_cert is not None or any(
        url.startswith("tls://") for url in config.nats)
    if tls:
        context = ssl.create_default_context(
            cafile=str(config.nats_tls_ca) if config.nats_tls_ca is not None else None)
        if config.nats_tls_cert is not None and config.nats_tls_key is not None:
            context.load_cert_chain(str(config.nats_tls_cert), str(config.nats_tls_key))
        options["tls"] = context
    return options
