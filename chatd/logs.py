"""Structured logs: one JSON object per line on stderr.

Every record carries ``ts``, ``level``, ``event``, ``node`` and ``component``. Errors carry
a stable ``error`` code so that operators can count and alert on them; no record ever
carries a message body or a token. Components log through an :class:`EventLog` bound to
their node and component name, so two nodes in one process keep their records apart.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import attrs

__all__ = ["EventLog", "JsonFormatter", "configure", "root_cause"]

_FIELDS = "chatd_fields"


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` with its structured fields."""
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, _FIELDS, None)
        if fields is None:
            out["event"] = "log"
            out["message"] = record.getMessage()
        else:
            out["event"] = record.msg
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every ``chatd`` logger's records to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("chatd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@attrs.frozen
class EventLog:
    """A logger bound to a node and component; records are events with fields.

    Args:
        logger: The module's named logger.
        node: The node name put on every record.
        component: The actor role or module that logs (``session``, ``store``...).
    """

    logger: logging.Logger
    node: str
    component: str

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            fields["node"] = self.node
            fields["component"] = self.component
            self.logger.log(level, event, exc_info=exc_info, extra={_FIELDS: fields})

    def debug(self, event: str, **fields: Any) -> None:
        """Log a debug event."""
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log an informational event."""
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log a warning event."""
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, error: str, exc_info: bool = False, **fields: Any) -> None:
        """Log a normalized error: ``error`` is a stable code, never free text."""
        fields["error"] = error
        self._log(logging.ERROR, event, exc_info, fields)



def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (trio nurseries wrap what their tasks raise)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
