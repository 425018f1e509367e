"""The ``chatd`` command: run the daemon, mint tokens, configure NATS, send, listen, ask
for last seen.

Exit status: 0 on success; 1 when the operation failed at run time (refused, timed out,
connection lost), with a one-line ``chatd: error: ...`` on stderr; 2 for a usage or
configuration error. Client commands print one JSON object per line on stdout.

``chatd serve`` runs one node in this process; with ``--workers N`` (above 1) it supervises
N node processes instead (:mod:`chatd.workers`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from chatd import __version__
from chatd.actors import RestartIntensityExceeded
from chatd.auth import load_or_create_secret, mint_token, read_secret
from chatd.backends import BackendUnavailable
from chatd.backends.embedded import ReplicaFailed
from chatd.backends.nats.server import ServerSpec, cluster_configs, render
from chatd.client import ChatError, Client, close_info, connect, new_id
from chatd.config import Config, ConfigError, load_config
from chatd.logs import configure, root_cause
from chatd.node import Node
from chatd.protocol import Error, ErrorCode, Msg, Receipt, Sent
from chatd.workers import WorkersFailed, report_ready, run_workers, watch_supervisor

__all__ = ["main"]

_RANK = {"sent": 0, "delivered": 1, "read": 2}


class CommandError(Exception):
    """A run-time failure reported as one line and exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, data_dir=getattr(args, "data_dir", None),
                       host=getattr(args, "host", None), port=getattr(args, "port", None),
                       node=getattr(args, "node", None),
                       log_level=getattr(args, "log_level", None),
                       secret_file=getattr(args, "secret_file", None),
                       store=getattr(args, "store", None),
                       store_dirs=getattr(args, "store_dir", None),
                       nats=getattr(args, "nats", None),
                       nats_creds=getattr(args, "nats_creds", None),
                       workers=getattr(args, "workers", None),
                       reuse_port=getattr(args, "reuse_port", None))


# -- serve ---------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    config = _config(args)
    configure(config.log_level)
    if config.workers > 1:
        try:
            run_workers(config, _passthrough(args))
        except WorkersFailed as exc:
            raise CommandError(str(exc)) from None
        return 0
    try:
        graceful = trio.run(_run_node, config, getattr(args, "supervised", False))
    except BaseExceptionGroup as group:
        leaf = root_cause(group)
        if isinstance(leaf, OSError) and leaf.filename:
            raise CommandError(f"cannot use {leaf.filename}: {leaf.strerror}") from None
        if isinstance(leaf, OSError):
            raise CommandError(f"cannot serve on {config.host}:{config.port}: "
                               f"{leaf.strerror or leaf}") from None
        if isinstance(leaf, RestartIntensityExceeded | ValueError | ReplicaFailed
                      | BackendUnavailable):
            raise CommandError(str(leaf)) from None
        raise
    except BackendUnavailable as exc:
        raise CommandError(str(exc)) from None
    if not graceful:
        raise CommandError("stopped by a second signal before the shutdown finished")
    return 0


async def _run_node(config: Config, supervised: bool = False) -> bool:
    """Run a node until it stops; False if a second signal cut the shutdown short.

    Args:
        config: The node's configuration.
        supervised: The node is a worker of ``chatd serve --workers``: it reports on
            stdout when it serves, and stops when its supervisor is gone.
    """
    node = Node(config)
    forced = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, node, nursery.cancel_scope, forced)
            if supervised:
                nursery.start_soon(watch_supervisor, config.node, node.request_shutdown)

            async def serve(*, task_status: trio.TaskStatus[Node]) -> None:
                await node.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            if supervised:
                report_ready(node.url)
            freeze_startup_heap()
    return not forced.is_set()


#: ``chatd serve`` options the supervisor of ``--workers`` sets itself for each worker.
_PER_WORKER = frozenset({"data_dir", "host", "port", "node", "secret_file", "store_dir",
                         "nats", "workers", "reuse_port", "supervised"})


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The ``chatd serve`` options of this command line that every worker gets as they are.

    Every option of the ``serve`` parser that was given and is not set per worker
    (``--config``, ``--log-level``, ``--store``, and any option added later) is written
    back as ``--option=value``.
    """
    options: list[str] = []
    parser: argparse.ArgumentParser = args.serve_parser
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in _PER_WORKER or value in (None, False):
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            options.append(flag)
        else:
            options += [f"{flag}={item}" for item in (value if isinstance(value, list)
                                                      else [value])]
    return options


def freeze_startup_heap() -> None:
    """Collect once, then exempt everything alive (modules, the node's tree, a recovered
    store) from the garbage collector's future passes.

    A full pass of the collector stops the whole node for as long as it takes to visit
    every tracked object; start-up objects live as long as the process, so visiting them
    again is pure pause (trio#1770). Done here, once per process, not in :class:`Node`, which
    several tests run side by side in one process.
    """
    gc.collect()
    gc.freeze()


async def _on_signals(signals: Any, node: Node, scope: trio.CancelScope,
                      forced: trio.Event) -> None:
    """First signal: graceful shutdown. Second: stop now."""
    async for _ in signals:
        if node.shutdown_requested:
            forced.set()
            scope.cancel()
        else:
            node.request_shutdown()


# -- token ---------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    config = _config(args)
    if not 0 < len(args.user) <= 64 or not all("\x21" <= c <= "\x7e" for c in args.user):
        raise ConfigError("USER must be 1-64 printable ASCII characters without spaces")
    path = config.secret_path
    try:
        secret = read_secret(path) if args.secret_file else load_or_create_secret(path)
    except OSError as exc:
        raise CommandError(f"cannot read secret {path}: {exc.strerror or exc}") from None
    print(mint_token(secret, args.user, args.ttl))
    return 0


# -- nats-config -----------------------------------------------------------------------


def _nats_config(args: argparse.Namespace) -> int:
    store = args.store_dir.resolve()
    if args.cluster:
        specs = cluster_configs(args.host or ["127.0.0.1"], store, port=args.port,
                                cluster_port=args.cluster_port)
    else:
        if args.host and len(args.host) > 1:
            raise ConfigError("--host is given once for one server (three times with --cluster)")
        specs = [ServerSpec("nats-1", (args.host or ["127.0.0.1"])[0], args.port, store)]
    for spec in specs:
        for port in (spec.port, spec.cluster_port):
            if not 0 <= port <= 65535:
                raise ConfigError(f"port must be 0-65535, not {port}")
    if args.out is None:
        for spec in specs:
            if len(specs) > 1:
                print(f"# ---- {spec.name}.conf ----")
            print(render(spec), end="")
        return 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            (args.out / f"{spec.name}.conf").write_text(render(spec))
    except OSError as exc:
        raise CommandError(f"cannot write to {exc.filename or args.out}: "
                           f"{exc.strerror or exc}") from None
    for spec in specs:
        print(f"nats-server -c {args.out / f'{spec.name}.conf'}")
    return 0


# -- client commands -----------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _with_client(args: argparse.Namespace,
                       body: Callable[[Client], Coroutine[Any, Any, None]]) -> None:
    try:
        with trio.fail_after(args.timeout) if args.timeout else _no_deadline():
            async with connect(_urls(args), args.token) as client:
                await body(client)
    except trio.TooSlowError:
        raise CommandError(f"timed out after {args.timeout} s") from None
    except ChatError as exc:
        raise CommandError(f"refused: {exc.code}: {exc.message}") from None
    except (OSError, HandshakeError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise CommandError(f"cannot connect to {', '.join(_urls(args))}: {cause}") from None
    except ConnectionClosed as exc:
        code, reason = close_info(exc)
        raise CommandError(f"connection closed: {code} {reason or ''}".rstrip()) from None


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
        raise ConfigError("--id names a single message; it cannot be used with -")
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
                _emit({"type": "sent", "id": msg_id, "ts": ts, "dup": dup})
                states[msg_id] = max(states.get(msg_id, 0), 0)
            case Receipt(seq=seq, status=status, by=by, ids=receipt_ids, ts=ts):
                for msg_id in receipt_ids:
                    if msg_id in states:
                        _emit({"type": status, "id": msg_id, "by": by, "ts": ts})
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
                _emit({"type": "msg", "id": msg_id, "from": sender, "body": body, "seq": seq,
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
    presence = await client.last_seen(args.user)
    _emit({"user": presence.user, "online": presence.online, "last_seen": presence.last_seen})


def _client_command(body: Callable[[argparse.Namespace, Client], Coroutine[Any, Any, None]]
                    ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not args.token:
            raise ConfigError("a token is needed: --token TOKEN or CHATD_TOKEN")
        trio.run(_with_client, args, lambda client: body(args, client))
        return 0
    return run


# -- parser --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatd", description="A self-hosted chat server.")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--data-dir", type=Path, help="data directory (default ./chatd-data)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on; 0 picks one (default 8765)")
    serve.add_argument("--node", help="node name (default node1)")
    serve.add_argument("--secret-file", type=Path, help="token secret (default DATA_DIR/secret)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--store", choices=["durable", "memory"],
                       help="where queues live (default durable: two replicas on disk)")
    serve.add_argument("--nats", action="append", metavar="URL",
                       help="run on NATS JetStream at URL (nats://HOST:PORT) instead of the "
                            "embedded store; once per server of the NATS cluster")
    serve.add_argument("--nats-creds", type=Path, metavar="FILE",
                       help="NATS credentials file (JWT and nkey seed)")
    serve.add_argument("--store-dir", type=Path, action="append",
                       help="a replica directory; give it twice (default "
                            "DATA_DIR/store/0 and DATA_DIR/store/1)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="node processes to run on this machine, sharing the port "
                            "(default 1)")
    serve.add_argument("--reuse-port", action="store_true", default=None,
                       help="listen with SO_REUSEPORT, so other processes may share the port")
    # A worker of `chatd serve --workers`: report readiness on stdout, stop at stdin EOF.
    serve.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve, serve_parser=serve)

    token = commands.add_parser("token", help="print a token for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--config", type=Path, help="TOML configuration file")
    token.add_argument("--data-dir", type=Path, help="data directory holding the secret")
    token.add_argument("--secret-file", type=Path, help="read the secret from this file")
    token.add_argument("--ttl", type=float, default=86400.0,
                       help="seconds until the token expires (default 86400)")
    token.set_defaults(run=_token)

    nats = commands.add_parser(
        "nats-config", help="print a nats-server configuration for chatd (JetStream, "
                            "every write fsync'd)")
    nats.add_argument("--cluster", action="store_true",
                      help="three servers forming one JetStream cluster")
    nats.add_argument("--host", action="append", metavar="HOST",
                      help="address to listen on (default 127.0.0.1); with --cluster, once "
                           "per server, or once for all three on one machine")
    nats.add_argument("--port", type=int, default=4222,
                      help="client port (default 4222; counts up on one machine)")
    nats.add_argument("--cluster-port", type=int, default=6222,
                      help="cluster port (default 6222; counts up on one machine)")
    nats.add_argument("--store-dir", type=Path, default=Path("nats-data"),
                      help="where JetStream keeps its files (default ./nats-data)")
    nats.add_argument("--out", type=Path, metavar="DIR",
                      help="write the files (nats-1.conf...) to DIR instead of printing them")
    nats.set_defaults(run=_nats_config)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", action="append", dest="urls", metavar="URL",
                         help="node URL (default ws://127.0.0.1:8765); give it once per "
                              "node to fail over between them")
        sub.add_argument("--token", default=os.environ.get("CHATD_TOKEN"),
                         help="token (default $CHATD_TOKEN)")
        return sub

    send = client_parser("send", "send TEXT (or each line of stdin with -)")
    send.add_argument("--to", required=True, help="recipient user id")
    send.add_argument("--wait", choices=list(_RANK), default="sent",
                      help="state to wait for (default sent)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    send.add_argument("--id", help="message id (idempotency key) for a single message")
    send.add_argument("text", metavar="TEXT", help="the message, or - for stdin lines")
    send.set_defaults(run=_client_command(_send_body))

    listen = client_parser("listen", "print incoming messages as JSON lines")
    listen.add_argument("--read", action="store_true", help="also mark each message read")
    listen.add_argument("--count", type=int, help="exit after N messages")
    listen.add_argument("--timeout", type=float, help="seconds (default: no limit)")
    listen.set_defaults(run=_client_command(_listen_body))

    lastseen = client_parser("lastseen", "print USER's presence and last seen")
    lastseen.add_argument("user", metavar="USER")
    lastseen.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    lastseen.set_defaults(run=_client_command(_lastseen_body))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except (ConfigError, ValueError) as exc:
        print(f"chatd: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"chatd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
