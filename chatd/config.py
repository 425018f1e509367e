"""The daemon's configuration: embedded defaults, a TOML file, command-line overrides.

Every setting has a default that works on a laptop, so ``chatd serve`` needs no file. A
TOML file (``--config``) sets top-level keys named like the attributes of :class:`Config`,
and a ``[limits]`` table for the protocol limits; unknown keys are an error, so a typo
never passes silently. docs/operations.md lists every key with its default.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import attrs

from chatd.metrics import LATENCY_BUCKETS
from chatd.protocol import MAX_RECEIPT_IDS, Limits

__all__ = ["MAX_WORKERS", "Config", "ConfigError", "host_port", "load_config"]


class ConfigError(Exception):
    """The configuration is unreadable or names an unknown or ill-typed setting."""


def _paths(values: Any) -> tuple[Path, ...]:
    return tuple(Path(v) for v in values)


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, not {value}")


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{attribute.name} must be between 0 and 1, not {value}")


#: The most worker processes ``chatd serve --workers`` starts.
MAX_WORKERS = 64
_NATS_SCHEMES = ("nats", "tls")
_NAMESPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


@attrs.frozen
class Config:
    """Everything a node needs to run. Times are in seconds."""

    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = attrs.field(default=Path("chatd-data"), converter=Path)
    node: str = "node1"
    secret_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    log_level: str = "info"
    store: str = "durable"
    store_dirs: tuple[Path, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(_paths))
    segment_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    checkpoint_interval: float = attrs.field(default=10.0, validator=_positive)
    auth_timeout: float = attrs.field(default=5.0, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    ping_interval: float = attrs.field(default=20.0, validator=_positive)
    idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    mailbox_capacity: int = attrs.field(default=1024, validator=_positive)
    online_threshold: float = attrs.field(default=60.0, validator=_positive)
    max_subscriptions: int = attrs.field(default=1000, validator=_positive)
    rate_limit: float = attrs.field(default=500.0, validator=_positive)
    rate_burst: int = attrs.field(default=2000, validator=_positive)
    max_unauthenticated_per_address: int = attrs.field(default=64, validator=_positive)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive)
    dedup_window: float = attrs.field(default=86400.0, validator=_positive)
    dedup_max_ids: int = attrs.field(default=1_000_000, validator=_positive)
    max_unread: int = attrs.field(default=10_000, validator=_positive)
    restart_intensity: int = attrs.field(default=5, validator=_positive)
    restart_period: float = attrs.field(default=10.0, validator=_positive)
    #: How long a user's last seen is kept after their last activity.
    last_seen_ttl: float = attrs.field(default=30 * 86400.0, validator=_positive)
    #: NATS server URLs: set, the node runs on the NATS backend instead of the embedded one.
    nats: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Prefix of every subject, stream and bucket chatd uses on NATS.
    nats_namespace: str = "chatd"
    #: Replicas of chatd's streams and buckets; 0 picks 3 on a cluster, 1 on one server.
    nats_replicas: int = 0
    #: Seconds to wait for a NATS answer (and for the first connection) before giving up.
    nats_timeout: float = attrs.field(default=5.0, validator=_positive)
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: Path | None = attrs.field(default=None,
                                          converter=attrs.converters.optional(Path))
    nats_nkey: Path | None = attrs.field(default=None,
                                         converter=attrs.converters.optional(Path))
    nats_tls_ca: Path | None = attrs.field(default=None,
                                           converter=attrs.converters.optional(Path))
    nats_tls_cert: Path | None = attrs.field(default=None,
                                             converter=attrs.converters.optional(Path))
    nats_tls_key: Path | None = attrs.field(default=None,
                                            converter=attrs.converters.optional(Path))
    #: Node processes ``chatd serve`` runs on this machine, 1-64; above 1 it supervises
    #: that many workers sharing ``port`` on NATS (:mod:`chatd.workers`).
    workers: int = 1
    #: Set SO_REUSEPORT on the WebSocket sockets, so that several processes share the port.
    reuse_port: bool = False
    #: Serve ``wss://``: the certificate chain (PEM) and its private key (:mod:`chatd.tls`).
    tls_cert: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    tls_key: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: The HTTP front (health, readiness, metrics) as HOST:PORT; "" turns it off.
    http_listen: str = "127.0.0.1:8766"
    #: The send latency objective: a share of sends answered within a latency (seconds,
    #: a bound of the latency histogram).
    slo_latency_seconds: float = 0.005
    slo_latency_target: float = attrs.field(default=0.9999, validator=_fraction)
    #: The send availability objective: the share of sends answered without a server error.
    slo_availability_target: float = attrs.field(default=0.99999, validator=_fraction)
    #: Seconds between two samples of the objectives' counts.
    slo_interval: float = attrs.field(default=10.0, validator=_positive)
    limits: Limits = attrs.field(factory=Limits)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")
        if self.ping_interval >= self.idle_timeout:
            raise ConfigError("ping_interval must be shorter than idle_timeout")
        if not all("\x21" <= ch <= "\x7e" for ch in self.node) or not 0 < len(self.node) <= 32:
            raise ConfigError("node must be 1-32 printable ASCII characters without spaces")
        _check_limits(self.limits)
        if self.rate_burst < self.limits.max_frames:
            raise ConfigError("rate_burst must be at least limits.max_frames (one full message)")
        if self.store not in ("durable", "memory"):
            raise ConfigError(f"store must be 'durable' or 'memory', not {self.store!r}")
        if self.store_dirs is not None and len(self.store_dirs) != 2:
            raise ConfigError("store_dirs must name exactly two directories (the replicas)")
        for url in self.nats:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in _NATS_SCHEMES or not rest:
                raise ConfigError(f"nats URL must be nats://HOST:PORT (or tls://), not {url!r}")
        if not _NAMESPACE.fullmatch(self.nats_namespace):
            raise ConfigError("nats_namespace must be 1-32 letters, digits or _, starting "
                              f"with a letter, not {self.nats_namespace!r}")
        if not 0 <= self.nats_replicas <= 5:
            raise ConfigError(f"nats_replicas must be 0-5, not {self.nats_replicas}")
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ConfigError("nats_tls_cert and nats_tls_key go together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.slo_latency_seconds not in LATENCY_BUCKETS:
            raise ConfigError("slo_latency_seconds must be one of the latency histogram's "
                              f"bounds {list(LATENCY_BUCKETS)}, not {self.slo_latency_seconds}")
        if self.http_listen:
            host_port(self.http_listen, "http_listen (or \"\" for none)", zero=True)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 1-{MAX_WORKERS}, not {self.workers}")
        if (self.workers > 1 or self.reuse_port) and not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("workers and reuse_port need SO_REUSEPORT, which this system "
                              "does not have")

    @property
    def replica_paths(self) -> tuple[Path, ...]:
        """The durable store's two replica directories."""
        if self.store_dirs is not None:
            return self.store_dirs
        return (self.data_dir / "store" / "0", self.data_dir / "store" / "1")

    @property
    def secret_path(self) -> Path:
        """Where the token secret is read from (and created on first start)."""
        return self.secret_file if self.secret_file is not None else self.data_dir / "secret"


#: Smallest limits the server itself needs: frames nest a list in a map (depth 3), a
#: receipt carries up to MAX_RECEIPT_IDS ids, and a message with the largest body, with its
#: ids and stamps, must fit in one WebSocket message.
_MIN_DEPTH = 3
_FRAME_OVERHEAD = 1024


def host_port(text: str, what: str = "address", *, zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Args:
        text: The address.
        what: What it is, for the error.
        zero: Whether port 0 (any free port) is allowed.

    Raises:
        ConfigError: It is not HOST:PORT with a port of 1-65535 (0-65535 with ``zero``).
    """
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not (
            0 if zero else 1) <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, not {text!r}")
    return host, int(port)


def _check_limits(limits: Limits) -> None:
    for name in ("max_frame_bytes", "max_frames", "max_depth", "max_items",
                 "max_string_bytes"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name} must be positive")
    if limits.max_depth < _MIN_DEPTH:
        raise ConfigError(f"limits.max_depth must be at least {_MIN_DEPTH}")
    if limits.max_items < MAX_RECEIPT_IDS:
        raise ConfigError(f"limits.max_items must be at least {MAX_RECEIPT_IDS}")
    if limits.max_frame_bytes < limits.max_string_bytes + _FRAME_OVERHEAD:
        raise ConfigError(f"limits.max_frame_bytes must exceed limits.max_string_bytes by "
                          f"at least {_FRAME_OVERHEAD}")


#: Settings whose default is None and whose value is text (paths and credentials).
_OPTIONAL_TEXT = frozenset(("secret_file", "nats_user", "nats_password", "nats_token",
                            "nats_creds", "nats_nkey", "nats_tls_ca", "nats_tls_cert",
                            "nats_tls_key", "tls_cert", "tls_key"))


def _typed(cls: type[Any], table: dict[str, Any], where: str) -> dict[str, Any]:
    fields = {f.name: f for f in attrs.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None or key == "limits":
            raise ConfigError(f"unknown setting {where}{key!r}")
        default = field.default
        expected: tuple[type, ...]
        if key == "nats":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"setting {where}{key!r} must be a list of URLs")
            out[key] = value
            continue
        if key in _OPTIONAL_TEXT:
            if not isinstance(value, str):
                raise ConfigError(f"setting {where}{key!r} must be str")
            out[key] = value
            continue
        if key == "store_dirs":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"setting {where}{key!r} must be a list of two paths")
            out[key] = value
            continue
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, int):
            expected = (int,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (str,)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise ConfigError(f"setting {where}{key!r} must be {expected[0].__name__}")
        out[key] = value
    return out


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Build a :class:`Config` from defaults, an optional TOML file, then ``overrides``.

    Overrides whose value is None are ignored (an option not given on the command line).

    Raises:
        ConfigError: The file cannot be read or parsed, or a setting is unknown or invalid.
    """
    settings: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        raw_limits = raw.pop("limits", {})
        if not isinstance(raw_limits, dict):
            raise ConfigError("setting 'limits' must be a table")
        limits = _typed(Limits, raw_limits, "limits.")
        settings = _typed(Config, raw, "")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config(**settings, limits=Limits(**limits))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
