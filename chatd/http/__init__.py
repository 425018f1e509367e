"""The node's HTTP front: health, readiness and metrics, beside the WebSocket port.

One hypercorn server (its trio worker) per node, a permanent child of the node's
supervision tree, serving a Starlette application (:mod:`._app`). Later roles (media,
the HTTP API, the web client) add their routes to the same application.
"""

from ._front import HttpFront, HttpUnavailable, Readiness

__all__ = ["HttpFront", "HttpUnavailable", "Readiness"]
