"""``chatd nats-config``: nats-server configurations for chatd."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from chatd.backends.nats.server import ServerSpec, cluster_configs, render
from chatd.cli._common import CommandError
from chatd.config import ConfigError

__all__ = ["add_nats_config"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands


def add_nats_config(commands: Commands) -> None:
    """Add ``nats-config`` to the subcommands."""
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

