"""The ``chatd`` command line: the parser of every command, and the exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chatd import __version__
from chatd.cli._client import add_client_commands
from chatd.cli._common import CommandError
from chatd.cli._nats import add_nats_config
from chatd.cli._serve import add_serve
from chatd.cli._status import add_status
from chatd.cli._tokens import add_secret, add_token
from chatd.config import ConfigError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The parser of the ``chatd`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="chatd", description="A self-hosted chat server.")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve(commands)
    add_token(commands)
    add_secret(commands)
    add_nats_config(commands)
    add_client_commands(commands)
    add_status(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
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
