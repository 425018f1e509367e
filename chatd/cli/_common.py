"""What the command groups share: the run-time error, the configuration from options, and
JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

from chatd.config import Config, load_config

__all__ = ["CommandError", "Commands", "config_from_args", "emit"]

if TYPE_CHECKING:
    #: What each command group adds its subcommands to.
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class CommandError(Exception):
    """A run-time failure reported as one line and exit status 1."""


def config_from_args(args: argparse.Namespace) -> Config:
    """The configuration: ``--config``'s file, overridden by the options given.

    Raises:
        ConfigError: The file or a value is invalid.
    """
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
                       reuse_port=getattr(args, "reuse_port", None),
                       tls_cert=getattr(args, "tls_cert", None),
                       tls_key=getattr(args, "tls_key", None),
                       http_listen=getattr(args, "http_listen", None))


def emit(obj: dict[str, Any]) -> None:
    """Print one JSON object as a line on stdout, at once."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()
