"""Structured logs: one Elastic Common Schema (ECS) document per line on stderr.

Every record is a flat JSON object whose keys are ECS field names written with dots
(``"log.level"``, ``"event.code"``), which Filebeat's ``ndjson`` parser, Logstash's
``json`` codec and Elasticsearch all take as they are. Each carries when (``@timestamp``),
how bad (``log.level``), what happened (``event.action``) and its stable code
(``event.code``: what operators count and alert on), and who logged it: the node
(``service.node.name``) and the part of the node (``chatd.component``). Fields that ECS
names go by their ECS name (``user.id``, ``url.full``, ``process.pid``...); the rest of an
event's fields go under ``chatd.``, the custom namespace ECS suggests for a product's own
fields. An exception logged with a record becomes ``error.type``, ``error.message`` and
``error.stack_trace``. No record ever carries a message body or a token.

Components log through an :class:`EventLog` bound to their node and component name, so two
nodes in one process keep their records apart. docs/operations.md section 5 lists every
field and every code.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import attrs

from chatd import __version__

__all__ = ["DATASET", "ECS_FIELDS", "ECS_VERSION", "FOREIGN", "NAMESPACE", "EventLog",
           "JsonFormatter", "configure", "root_cause"]

#: The ECS version whose field names and types the records follow (every field chatd
#: writes has the same name and type from ECS 8.11 through 9.x).
ECS_VERSION = "8.11.0"
#: ``event.dataset`` of every record.
DATASET = "chatd.log"
#: The custom namespace of the event fields ECS has no name for.
NAMESPACE = "chatd."
#: Event fields that ECS names, by the name chatd's code logs them with; any other field
#: ``NAME`` is written ``chatd.NAME``.
ECS_FIELDS: Mapping[str, str] = {
    "node": "service.node.name",
    "error": "event.code",
    "reason": "event.reason",
    "user": "user.id",
    "url": "url.full",
    "pid": "process.pid",
    "status": "process.exit_code",
    "replica": "file.path",
}
#: The ``event.action`` (and code) of records that are not chatd events.
FOREIGN = "log"

_FIELDS = "chatd_fields"


class JsonFormatter(logging.Formatter):
    """Formats records as ECS documents, one line of JSON each.

    A chatd event (logged through :class:`EventLog`) has its name as ``message``,
    ``event.action`` and, unless it names another with ``error``, ``event.code``. A record
    of another logger has its formatted text as ``message``, ``log`` as ``event.action``
    and ``event.code``, and its logger's name as ``chatd.component``.

    Args:
        node: ``service.node.name`` of the records that do not name a node (those of other
            loggers).
    """

    def __init__(self, node: str) -> None:
        super().__init__()
        self._static = {
            "ecs.version": ECS_VERSION,
            "event.dataset": DATASET,
            "service.name": "chatd",
            "service.version": __version__,
            "host.hostname": socket.gethostname(),
        }
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON.

        Args:
            record: A record of a chatd event or of any other logger.

        Returns:
            The JSON object, without a newline.
        """
        fields: dict[str, Any] | None = getattr(record, _FIELDS, None)
        if fields is None:
            action, message, component = FOREIGN, record.getMessage(), record.name
            fields = {}
        else:
            action = message = record.msg
            component = ""
        # Read first when a person reads the line: when, how bad, what, where.
        out: dict[str, Any] = {
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "log.level": record.levelname.lower(),
            "message": message,
            "event.action": action,
            "event.code": action,
            "service.node.name": self._node,
            "chatd.component": component,
        }
        for name, value in fields.items():
            out[ECS_FIELDS.get(name) or NAMESPACE + name] = value
        if record.exc_info and record.exc_info[1] is not None:  # False when not asked for
            exc = root_cause(record.exc_info[1])
            cls = type(exc)
            out["error.type"] = (cls.__qualname__ if cls.__module__ == "builtins"
                                 else f"{cls.__module__}.{cls.__qualname__}")
            out["error.message"] = str(exc)
            out["error.stack_trace"] = self.formatException(record.exc_info)
        out["log.logger"] = record.name
        out.update(self._static)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(level: str, node: str, stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (stderr) as ECS JSON lines.

    chatd's own loggers log from ``level`` up; other libraries' (``asyncio``...), and
    Python's warnings (``py.warnings``), from warning up, in the same layout, instead of the
    plain text Python would print for them, so that every line is JSON.

    Args:
        level: The least level chatd logs (``debug``, ``info``, ``warning`` or ``error``).
        node: The node's name, for records that do not carry one.
        stream: Where the lines go; stderr if None.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node))
    chatd = logging.getLogger("chatd")
    chatd.handlers[:] = [handler]
    chatd.setLevel(level.upper())
    chatd.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


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
        """Log a warning event; an ``error`` field is its code, else the event's name."""
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, error: str, exc_info: bool = False, **fields: Any) -> None:
        """Log a normalized error: ``error`` is a stable code, never free text.

        Args:
            event: What happened (``event.action``).
            error: The stable code (``event.code``).
            exc_info: Whether to attach the exception being handled (``error.*``).
            fields: The event's other fields.
        """
        fields["error"] = error
        self._log(logging.ERROR, event, exc_info, fields)


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (trio nurseries wrap what their tasks raise)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
