"""The client commands, ``chatd send``, ``listen`` and ``lastseen``: connect to a node with
the client library, do one thing, print JSON lines.

Each failed attempt to connect, and each lost connection, after which the command tries
again is reported on stderr as it happens (``chatd: cannot connect: URL: CAUSE``). ``send``
and ``lastseen`` try each ``--url`` once in turn, and after a lost connection each once
again, then give up (``chatd: error: cannot connect: URL: CAUSE``, the last attempt's);
``listen`` tries as the library does by default: for its timeout (10 s) to connect the
first time, without end after a lost connection.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed

from chatd.cli._common import CommandError, emit
from chatd.client import ChatError, Client, ConnectFailed, Failure, close_info, connect, new_id
from chatd.config import ConfigError
from chatd.dial import client_context
from chatd.protocol import Error, ErrorCode, Msg, Receipt, Sent

__all__ = ["add_client_commands"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands

_RANK = {"sent": 0, "delivered": 1, "read": 2}


def add_client_commands(commands: Commands) -> None:
    """Add ``send``, ``listen`` and ``lastseen`` to the subcommands."""
    def client_parser(name: str, help_text: str, *, keep_trying: bool
                      ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        tries = ("tried in turn: for 10 s to connect, then without end after a lost "
                 "connection" if keep_trying
                 else "each is tried once in turn, and once again after a lost connection")
        sub.add_argument("--url", action="append", dest="urls", metavar="URL",
                         help="node URL (default ws://127.0.0.1:8765); give it once per "
                              f"node to fail over between them ({tries})")
        sub.add_argument("--token", default=os.environ.get("CHATD_TOKEN"),
                         help="token (default $CHATD_TOKEN)")
        sub.add_argument("--ca-file", type=Path, metavar="FILE",
                         help="for wss:// URLs: trust the CA certificates (PEM) in FILE "
                              "instead of the system's")
        sub.set_defaults(keep_trying=keep_trying)
        return sub

    send = client_parser("send", "send TEXT (or each line of stdin with -)",
                         keep_trying=False)
    send.add_argument("--to", required=True, help="recipient user id")
    send.add_argument("--wait", choices=list(_RANK), default="sent",
                      help="state to wait for (default sent)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    send.add_argument("--id", help="message id (idempotency key) of the one message: TEXT, "
                                   "or the single line of stdin with -")
    send.add_argument("text", metavar="TEXT", help="the message, or - for stdin lines")
    send.set_defaults(run=_client_command(_send_body))

    listen = client_parser("listen", "print incoming messages as JSON lines",
                           keep_trying=True)
    listen.add_argument("--read", action="store_true", help="also mark each message read")
    listen.add_argument("--count", type=int, help="exit after N messages")
    listen.add_argument("--timeout", type=float, help="seconds (default: no limit)")
    listen.set_defaults(run=_client_command(_listen_body))

    lastseen = client_parser("lastseen", "print USER's presence and last seen",
                             keep_trying=False)
    lastseen.add_argument("user", metavar="USER")
    lastseen.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    lastseen.set_defaults(run=_client_command(_lastseen_body))


async def _with_client(args: argparse.Namespace,
                       body: Callable[[Client], Coroutine[Any, Any, None]]) -> None:
    """Connect as the options say, run ``body``, and turn each way of failing into one
    line."""
    urls = _urls(args)
    ca = _ca_context(args.ca_file) if args.ca_file is not None else None
    last: list[Failure] = []

    def retrying(failure: Failure) -> None:
        last[:] = [failure]
        print(f"chatd: {failure}", file=sys.stderr, flush=True)

    try:
        with trio.fail_after(args.timeout) if args.timeout else _no_deadline():
            async with connect(urls, args.token, on_retry=retrying, ca=ca,
                               attempts=None if args.keep_trying else len(urls)) as client:
                await body(client)
    except trio.TooSlowError:
        raise CommandError(f"timed out after {args.timeout} s" + (
            f" (last: {last[0]})" if last else "")) from None
    except ChatError as exc:
        raise CommandError(f"refused: {exc.code}: {exc.message}") from None
    except ConnectFailed as exc:
        raise CommandError(f"cannot connect: {exc}") from None
    except ConnectionClosed as exc:
        code, reason = close_info(exc)
        raise CommandError(f"connection closed: {code} {reason or ''}".rstrip()) from None


def _ca_context(path: Path) -> ssl.SSLContext:
    """The TLS context that trusts the CA certificates in ``path``.

    Raises:
        CommandError: The file cannot be read, or holds no PEM certificate.
    """
    try:
        return client_context(path)
    except ssl.SSLError:
        raise CommandError(f"the CA file {path} holds no PEM certificate") from None
    except OSError as exc:
        raise CommandError(f"cannot read the CA file {path}: {exc.strerror or exc}") from None


def _urls(args: argparse.Namespace) -> list[str]:
    return args.urls or ["ws://127.0.0.1:8765"]


def _no_deadline() -> trio.CancelScope:
    return trio.CancelScope()


def _lines(text: str) -> list[str]:
    if text != "-":
        return [text]
    return [line.rstrip("\r\n") for line in sys.stdin]


async def _send_body(args: argparse.Namespace, client: Client) -> None:
    bodies = _lines(args.text)
    if not bodies:
        return
    if args.id is not None and len(bodies) > 1:
        raise ConfigError(f"--id names a single message, and stdin holds {len(bodies)} lines")
    ids = [args.id] if args.id is not None else [new_id() for _ in bodies]
    states: dict[str, int] = {}
    goal = _RANK[args.wait]
    await client.submit([(msg_id, args.to, body) for msg_id, body in zip(ids, bodies,
                                                                           strict=True)])
    pending = set(ids)
    # Receipts are acknowledged as they are consumed, but acknowledgements are cumulative:
    # once a message for this user shows up, stop, so it stays queued for `chatd listen`.
    may_ack = True
    async for event in client.events():
        match event:
            case Sent(id=msg_id, ts=ts, dup=dup) if msg_id in pending:
                emit({"type": "sent", "id": msg_id, "ts": ts, "dup": dup})
                states[msg_id] = max(states.get(msg_id, 0), 0)
            case Receipt(seq=seq, status=status, by=by, ids=receipt_ids, ts=ts):
                for msg_id in receipt_ids:
                    if msg_id in states:
                        emit({"type": status, "id": msg_id, "by": by, "ts": ts})
                        states[msg_id] = max(states[msg_id], _RANK[status])
                if may_ack:
                    await client.ack(seq)
            case Msg():
                may_ack = False
            case Error(code=code, message=message, ref=ref) if (
                    ref in pending or ErrorCode.is_fatal(code)):
                raise CommandError(f"refused: {code}: {message}")
            case _:
                continue
        if all(states.get(msg_id, -1) >= goal for msg_id in ids):
            return
    raise CommandError(_lost(client))


def _lost(client: Client) -> str:
    """Why the client closed for good, in one line."""
    if client.gave_up is not None:
        return f"cannot connect: {client.gave_up.url}: {client.gave_up.cause}"
    closed = client.closed
    if closed is None:
        return "connection closed"
    if closed.error is not None:
        return f"connection closed: {closed.error.code}: {closed.error.message}"
    return f"connection closed: {closed.code} {closed.reason or ''}".rstrip()


async def _listen_body(args: argparse.Namespace, client: Client) -> None:
    received = 0
    if args.count == 0:
        return
    async for event in client.events():
        match event:
            case Msg(seq=seq, id=msg_id, sender=sender, body=body, ts=ts):
                emit({"type": "msg", "id": msg_id, "from": sender, "body": body, "seq": seq,
                       "ts": ts})
                await client.ack(seq)
                if args.read:
                    await client.read(seq)
                received += 1
                if args.count is not None and received >= args.count:
                    return
            case Receipt(seq=seq):
                await client.ack(seq)
            case Error(code=code, message=message) if ErrorCode.is_fatal(code):
                raise CommandError(f"refused: {code}: {message}")
            case _:
                continue
    raise CommandError(_lost(client))


async def _lastseen_body(args: argparse.Namespace, client: Client) -> None:
    try:
        presence = await client.last_seen(args.user)
    except ChatError:
        if client.gave_up is None:
            raise
        raise CommandError(_lost(client)) from None
    emit({"user": presence.user, "online": presence.online, "last_seen": presence.last_seen})


def _client_command(body: Callable[[argparse.Namespace, Client], Coroutine[Any, Any, None]]
                    ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not args.token:
            raise ConfigError("a token is needed: --token TOKEN or CHATD_TOKEN")
        trio.run(_with_client, args, lambda client: body(args, client))
        return 0
    return run
