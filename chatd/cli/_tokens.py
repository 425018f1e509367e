"""``chatd token``: mint a token with the node's secret."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from chatd.auth import load_or_create_secret, mint_token, read_secret
from chatd.cli._common import CommandError, config_from_args
from chatd.config import ConfigError

__all__ = ["add_token"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands


def add_token(commands: Commands) -> None:
    """Add ``token`` to the subcommands."""
    token = commands.add_parser("token", help="print a token for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--config", type=Path, help="TOML configuration file")
    token.add_argument("--data-dir", type=Path, help="data directory holding the secret")
    token.add_argument("--secret-file", type=Path, help="read the secret from this file")
    token.add_argument("--ttl", type=float, default=86400.0,
                       help="seconds until the token expires (default 86400)")
    token.set_defaults(run=_token)


def _token(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not 0 < len(args.user) <= 64 or not all("\x21" <= c <= "\x7e" for c in args.user):
        raise ConfigError("USER must be 1-64 printable ASCII characters without spaces")
    path = config.secret_path
    try:
        secret = read_secret(path) if args.secret_file else load_or_create_secret(path)
    except OSError as exc:
        raise CommandError(f"cannot read secret {path}: {exc.strerror or exc}") from None
    print(mint_token(secret, args.user, args.ttl))
    return 0

