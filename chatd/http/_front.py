"""Running the HTTP application under hypercorn's trio worker, as a supervised child."""

from __future__ import annotations

import functools
import logging
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from chatd.config import Config
from chatd.logs import EventLog, root_cause
from chatd.metrics import Metrics

from ._app import Readiness, build_app

__all__ = ["HEAD_BYTES", "KEEP_ALIVE_TIMEOUT", "READ_TIMEOUT", "HttpFront", "HttpUnavailable",
           "Readiness"]

logger = logging.getLogger(__name__)

#: The most bytes a request line and headers may take (larger: the connection is closed).
HEAD_BYTES = 16 * 1024
#: Seconds a request may take to arrive, from its first byte to its last.
READ_TIMEOUT = 10
#: Seconds an idle keep-alive connection is kept.
KEEP_ALIVE_TIMEOUT = 5.0
#: Seconds hypercorn gives requests under way when the node shuts down.
GRACEFUL_TIMEOUT = 2.0


class HttpUnavailable(Exception):
    """The HTTP port cannot be opened: a one-line reason for the operator (exit status 1)."""


class HttpFront:
    """The node's HTTP server on ``config.http_listen``.

    Args:
        config: The node's configuration.
        metrics: The node's metrics.
        readiness: The backend's write check (``/readyz``).
    """

    def __init__(self, config: Config, metrics: Metrics, readiness: Readiness) -> None:
        self._config = config
        self._app = build_app(metrics, readiness)
        self._log = EventLog(logger, config.node, "http")
        #: The URL it serves at (with the real port), once started.
        self.url = ""

    def _hypercorn(self) -> HypercornConfig:
        hc = HypercornConfig()
        hc.bind = [self._config.http_listen]
        hc.h11_max_incomplete_size = HEAD_BYTES
        hc.read_timeout = READ_TIMEOUT
        hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        hc.graceful_timeout = GRACEFUL_TIMEOUT
        hc.include_server_header = False
        hc.accesslog = None
        # hypercorn's own records (a bad request, an application error) reach chatd's
        # JSON handler through a child of the chatd logger; its "Running on" line is
        # http_listening's.
        errorlog = logging.getLogger(f"{__name__}.hypercorn")
        errorlog.setLevel(logging.WARNING)
        hc.errorlog = errorlog
        return hc

    async def run(self, *, task_status: trio.TaskStatus[HttpFront] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; started once the socket listens.

        Raises:
            HttpUnavailable: The address cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            # Starlette is an ASGI application; its annotations are looser than hypercorn's.
            app = cast(ASGIFramework, self._app)
            try:
                binds: list[str] = await nursery.start(functools.partial(
                    serve, app, self._hypercorn(), mode="asgi"))
            except BaseExceptionGroup as group:  # trio's start() wraps what the task raised
                leaf = root_cause(group)
                if not isinstance(leaf, OSError):
                    raise
                raise HttpUnavailable(
                    f"cannot serve HTTP on {self._config.http_listen}: "
                    f"{leaf.strerror or leaf} (set http_listen, or \"\" for none)") from None
            self.url = binds[0]
            self._log.info("http_listening", url=self.url)
            task_status.started(self)
