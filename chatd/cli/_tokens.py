"""``chatd token`` and ``chatd secret new``: tokens, and the secret that signs them."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chatd.auth import ensure_secret, mint_token, new_secret_file, read_secret
from chatd.cli._common import CommandError, config_from_args
from chatd.config import ConfigError

__all__ = ["add_secret", "add_token"]

if TYPE_CHECKING:
    from chatd.cli._common import Commands


def add_token(commands: Commands) -> None:
    """Add ``token`` to the subcommands."""
    token = commands.add_parser("token", help="print a token for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--config", type=Path, help="TOML configuration file")
    token.add_argument("--data-dir", type=Path, help="data directory holding the secret")
    token.add_argument("--secret-file", type=Path, help="read the secret from this file")
    token.add_argument("--ttl", default="86400", metavar="SECONDS",
                       help="seconds until the token expires, at least 1 (default 86400)")
    token.set_defaults(run=_token)


def add_secret(commands: Commands) -> None:
    """Add ``secret new`` to the subcommands."""
    secret = commands.add_parser("secret", help="make a token secret file")
    actions = secret.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="write a new random secret to FILE (mode 0600), "
                                         "for the nodes' --secret-file")
    new.add_argument("file", type=Path, metavar="FILE")
    new.set_defaults(run=_secret_new)


def _token(args: argparse.Namespace) -> int:
    """Print a token for ``USER``; say on stderr which secret signed it.

    Raises:
        ConfigError: USER or ``--ttl`` is invalid, or the configuration is.
        CommandError: The secret cannot be read or created.
    """
    config = config_from_args(args)
    if not 0 < len(args.user) <= 64 or not all("\x21" <= c <= "\x7e" for c in args.user):
        raise ConfigError("USER must be 1-64 printable ASCII characters without spaces")
    ttl = _ttl(args.ttl)
    path = config.secret_path
    try:
        created = False if args.secret_file else ensure_secret(path)
        secret = read_secret(path)
    except OSError as exc:
        raise CommandError(f"cannot read secret {path}: {exc.strerror or exc}") from None
    if created:
        _say(f"secret: created {path} (none was there; only a daemon using this file "
             "accepts the token)")
    else:
        _say(f"secret: read from {path}")
    print(mint_token(secret, args.user, ttl))
    return 0


def _ttl(text: str) -> float:
    """The token's lifetime: a finite number of seconds, at least 1, so that the token has
    not expired when it is printed (``exp`` is rounded down to a whole second)."""
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl) or ttl < 1:
        raise ConfigError(f"--ttl must be a number of seconds, at least 1, not {text}")
    return ttl


def _secret_new(args: argparse.Namespace) -> int:
    """Write a new secret file; refuse to replace one.

    Raises:
        CommandError: FILE exists, or cannot be written.
    """
    path: Path = args.file
    try:
        new_secret_file(path)
    except FileExistsError as exc:
        if path.exists():
            raise CommandError(f"{path} already exists; a new secret would invalidate every "
                               "token signed with it") from None
        raise CommandError(f"cannot write {exc.filename}: {exc.strerror}") from None
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or path}: "
                           f"{exc.strerror or exc}") from None
    _say(f"secret: created {path}")
    return 0


def _say(text: str) -> None:
    print(f"chatd: {text}", file=sys.stderr, flush=True)
