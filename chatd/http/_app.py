"""The HTTP application: its routes, as a Starlette app.

- ``GET /healthz``: 200 while the process serves.
- ``GET /readyz``: 200 when the backend accepts writes, else 503 with a JSON body saying
  which check failed and why.
- ``GET /metrics``: every metric in the Prometheus text format.

Any other path is 404 and any other method 405, with a JSON body; the application never
reads a request body.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chatd.metrics import Metrics

__all__ = ["Readiness", "build_app"]

#: Returns None when the backend accepts writes, else (check, reason): which check failed
#: (``store``, ``nats``) and why, in one line.
Readiness = Callable[[], tuple[str, str] | None]


def build_app(metrics: Metrics, readiness: Readiness) -> Starlette:
    """The node's HTTP application.

    Args:
        metrics: The node's metrics, rendered at each scrape of ``/metrics``.
        readiness: The backend's write check, run at each request of ``/readyz``.

    Returns:
        The ASGI application.
    """

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        failed = readiness()
        if failed is None:
            return JSONResponse({"status": "ready"})
        check, reason = failed
        return JSONResponse({"status": "unavailable", "check": check, "reason": reason},
                            status_code=503)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"status": "error", "reason": exc.detail},
                            status_code=exc.status_code, headers=exc.headers)

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error})
