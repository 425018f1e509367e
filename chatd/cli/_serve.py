"""``chatd serve``: run one node in this process, or with ``--workers N`` (above 1)
supervise N node processes (:mod:`chatd.workers`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from chatd.actors import RestartIntensityExceeded
from chatd.backends import BackendUnavailable
from chatd.backends.embedded import ReplicaFailed
from chatd.cli._common import CommandError, config_from_args
from chatd.collector import Collector
from chatd.config import Config
from chatd.http import HttpUnavailable
from chatd.logs import configure, root_cause
from chatd.node import Node
from chatd.tls import TlsError, server_context
from chatd.workers import WorkersFailed, report_ready, run_workers, watch_supervisor

__all__ = ["add_serve", "passthrough"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands


def add_serve(commands: Commands) -> None:
    """Add ``serve`` to the subcommands."""
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
    serve.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="serve wss:// with this certificate chain (PEM); with --tls-key "
                            "(default: plain ws://)")
    serve.add_argument("--tls-key", type=Path, metavar="FILE",
                       help="the private key (PEM, no passphrase) of --tls-cert")
    serve.add_argument("--http-listen", metavar="HOST:PORT",
                       help="the HTTP port for /healthz, /readyz and /metrics; \"\" for none "
                            "(default 127.0.0.1:8766; with --workers, worker N gets PORT+N-1)")
    # A worker of `chatd serve --workers`: report readiness on stdout, stop at stdin EOF.
    serve.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve, serve_parser=serve)


def _serve(args: argparse.Namespace) -> int:
    """Run the node (or the workers) until it stops; 0 after a graceful stop.

    Raises:
        ConfigError: The configuration is invalid.
        CommandError: The node could not start, or failed, or a second signal cut its
            shutdown short.
    """
    config = config_from_args(args)
    configure(config.log_level, config.node)
    if config.workers > 1:
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                server_context(config.tls_cert, config.tls_key)  # before any worker starts
            run_workers(config, passthrough(args))
        except (WorkersFailed, TlsError) as exc:
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
                      | BackendUnavailable | TlsError | HttpUnavailable):
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
    collector = Collector()
    with (trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
          contextlib.closing(collector)):
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
            collector.install()
            nursery.start_soon(collector.run)
    return not forced.is_set()


#: ``chatd serve`` options the supervisor of ``--workers`` sets itself for each worker.
_PER_WORKER = frozenset({"data_dir", "host", "port", "node", "secret_file", "store_dir",
                         "nats", "workers", "reuse_port", "supervised"})


def passthrough(args: argparse.Namespace) -> list[str]:
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


async def _on_signals(signals: Any, node: Node, scope: trio.CancelScope,
                      forced: trio.Event) -> None:
    """First signal: graceful shutdown. Second: stop now."""
    async for _ in signals:
        if node.shutdown_requested:
            forced.set()
            scope.cancel()
        else:
            node.request_shutdown()

