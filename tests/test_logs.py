"""The log records: Elastic Common Schema documents, one per line, with the documented fields.

docs/operations.md section 5 is the contract a log pipeline is built on. The schema below
is its "Fields" table written as code (and checked against that table); every record a real
daemon writes through one chat with one failure must validate against it. The codes of
every warning and error chatd's code logs must be in its "Warning and error codes" table.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemons import DEADLINE, action, serve

from chatd.client import ChatError, connect
from chatd.logs import EventLog, JsonFormatter, configure
from chatd.protocol import Msg, Receipt, Sent

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"

#: The fields every record has, and their JSON types.
EVERY_RECORD: dict[str, type] = {
    "@timestamp": str, "log.level": str, "message": str, "event.action": str,
    "event.code": str, "service.node.name": str, "chatd.component": str, "log.logger": str,
    "event.dataset": str, "ecs.version": str, "service.name": str, "service.version": str,
    "host.hostname": str,
}
#: The ECS fields some events have.
SOME_EVENTS: dict[str, type] = {
    "event.reason": str, "user.id": str, "url.full": str, "process.pid": int,
    "process.exit_code": int, "file.path": str,
}
#: The fields of a record logged with an exception: all three or none.
WITH_EXCEPTION: dict[str, type] = {
    "error.type": str, "error.message": str, "error.stack_trace": str,
}
#: The custom namespace: any other field of an event, ``chatd.NAME``.
CUSTOM = "chatd."
LEVELS = {"debug", "info", "warning", "error", "critical"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_TYPE_NAMES = {str: "string", int: "integer"}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def check_record(record: Any) -> None:
    """Assert that ``record`` has the documented fields and types, and no other field.

    Raises:
        AssertionError: Naming the first field that breaks the schema.
    """
    assert isinstance(record, dict), record
    for field, kind in EVERY_RECORD.items():
        assert _is(record.get(field), kind), (field, record)
    assert TIMESTAMP.fullmatch(record["@timestamp"]), record
    assert record["log.level"] in LEVELS, record
    assert record["event.dataset"] == "chatd.log" and record["service.name"] == "chatd"
    assert re.fullmatch(r"\d+\.\d+\.\d+", record["ecs.version"]), record
    for field in ("event.action", "event.code", "service.node.name", "chatd.component"):
        assert record[field], (field, record)
    assert len({field in record for field in WITH_EXCEPTION}) == 1, record
    for field, value in record.items():
        if field in EVERY_RECORD:
            continue
        kind = SOME_EVENTS.get(field) or WITH_EXCEPTION.get(field)
        if kind is not None:
            assert _is(value, kind), (field, record)
        else:
            assert field.startswith(CUSTOM) and field.count(".") == 1, (field, record)
            assert _scalar(value) or (
                isinstance(value, list) and all(_scalar(item) for item in value)), (
                field, record)


def _section(title: str) -> list[str]:
    """The lines of the docs/operations.md subsection ``### title``."""
    lines = OPERATIONS.read_text().splitlines()
    start = lines.index(f"### {title}") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("#"))
    return lines[start:end]


def _rows(title: str) -> list[list[str]]:
    """The cells of the rows of the first table in that subsection, under its header."""
    lines = _section(title)
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in lines[start + 2:end]]


def test_the_schema_is_the_documented_field_table() -> None:
    documented = {row[0].strip("`"): (row[1], row[2]) for row in _rows("Fields")}
    expected = {field: (_TYPE_NAMES[kind], "every record")
                for field, kind in EVERY_RECORD.items()}
    expected |= {field: (_TYPE_NAMES[kind], "some events")
                 for field, kind in SOME_EVENTS.items()}
    expected |= {field: (_TYPE_NAMES[kind], "records with an exception")
                 for field, kind in WITH_EXCEPTION.items()}
    expected[f"{CUSTOM}NAME"] = ("number, string, boolean or list", "some events")
    assert documented == expected


# -- records of each kind, formatted -------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[tuple[Callable[[str], EventLog], Callable[[], list[str]]]]:
    """EventLogs of a logger of its own that formats to a buffer, and the lines written."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("fallback"))
    logger = logging.getLogger("chatd.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield (lambda component: EventLog(logger, "node1", component),
               lambda: stream.getvalue().splitlines())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def one_record(lines: list[str]) -> dict[str, Any]:
    """The record of the only line, checked against the schema."""
    (line,) = lines
    record = json.loads(line)
    check_record(record)
    return record


def _common(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without the fields every record has, but for those a test checks."""
    return {k: v for k, v in record.items() if k not in EVERY_RECORD}


def test_an_info_event(log_lines: Any) -> None:
    log, lines = log_lines
    log("listener").info("listening", url="ws://127.0.0.1:8765")
    record = one_record(lines())
    assert {k: record[k] for k in ("log.level", "message", "event.action", "event.code",
                                   "service.node.name", "chatd.component", "log.logger")} == {
        "log.level": "info", "message": "listening", "event.action": "listening",
        "event.code": "listening", "service.node.name": "node1",
        "chatd.component": "listener", "log.logger": "chatd.test_logs"}
    assert _common(record) == {"url.full": "ws://127.0.0.1:8765"}


def test_a_warning_with_fields_and_a_code_of_its_own(log_lines: Any) -> None:
    log, lines = log_lines
    log("listener").warning("accept_paused", error="too_many_open_files", errno=24,
                            user="alice", reason="no descriptors", pid=7, status=-9,
                            replica="/srv/r0", reasons=["a", "b"])
    record = one_record(lines())
    assert (record["log.level"], record["event.action"], record["event.code"]) == (
        "warning", "accept_paused", "too_many_open_files")
    assert _common(record) == {
        "chatd.errno": 24, "user.id": "alice", "event.reason": "no descriptors",
        "process.pid": 7, "process.exit_code": -9, "file.path": "/srv/r0",
        "chatd.reasons": ["a", "b"]}


class Boom(Exception):
    """A failure of a test's own."""


def test_an_error_with_an_exception_names_its_root_cause(log_lines: Any) -> None:
    log, lines = log_lines
    try:
        raise ExceptionGroup("nursery", [Boom("the leaf"), ValueError("other")])
    except ExceptionGroup:
        log("listener").error("session_crashed", error="session_crashed", user="bob",
                              exc_info=True)
    record = one_record(lines())
    assert (record["log.level"], record["event.code"], record["user.id"]) == (
        "error", "session_crashed", "bob")
    assert record["error.type"] == f"{__name__}.Boom"
    assert record["error.message"] == "the leaf"
    assert "ExceptionGroup: nursery" in record["error.stack_trace"]
    assert "Boom: the leaf" in record["error.stack_trace"]
    assert set(_common(record)) == {"user.id", "error.type", "error.message",
                                    "error.stack_trace"}


def test_an_error_without_an_exception_has_no_error_fields(log_lines: Any) -> None:
    log, lines = log_lines
    log("store").error("replica_failed", error="replica_failed", reason="[Errno 28] full")
    record = one_record(lines())
    assert _common(record) == {"event.reason": "[Errno 28] full"}


def test_the_record_of_another_library(log_lines: Any) -> None:
    _, lines = log_lines
    logger = logging.getLogger("chatd.test_logs")
    logger.warning("disk %s at %d%%", "full", 99)
    record = one_record(lines())
    assert {k: record[k] for k in ("message", "event.action", "event.code",
                                   "service.node.name", "chatd.component")} == {
        "message": "disk full at 99%", "event.action": "log", "event.code": "log",
        "service.node.name": "fallback", "chatd.component": "chatd.test_logs"}
    assert _common(record) == {}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and ``chatd`` loggers back as they were (pytest's handlers included)."""
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate)
             for logger in (logging.getLogger(), logging.getLogger("chatd"))]
    try:
        yield
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_configure_writes_other_libraries_warnings_as_records() -> None:
    stream = io.StringIO()
    configure("debug", "node1", stream)
    EventLog(logging.getLogger("chatd.test_logs"), "node1", "node").debug("opened")
    logging.getLogger("asyncio").info("not logged: below warning")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    for record in (first, second):
        check_record(record)
    assert (first["log.level"], first["event.action"]) == ("debug", "opened")
    assert {k: second[k] for k in ("log.level", "event.code", "chatd.component",
                                   "service.node.name", "message")} == {
        "log.level": "error", "event.code": "log", "chatd.component": "asyncio",
        "service.node.name": "node1", "message": "Task exception was never retrieved"}


async def test_python_warnings_are_records_too() -> None:
    code = ("import warnings; from chatd.logs import configure; configure('info', 'node1'); "
            "warnings.warn('careful', RuntimeWarning)")
    with trio.fail_after(DEADLINE):
        result = await trio.run_process([sys.executable, "-c", code], capture_stderr=True)
    record = one_record(result.stderr.decode().splitlines())
    assert (record["log.level"], record["event.code"], record["log.logger"]) == (
        "warning", "log", "py.warnings")
    assert "RuntimeWarning: careful" in record["message"]


# -- every code documented -----------------------------------------------------------------


def _is_event_log(node: ast.expr) -> bool:
    """Whether ``node`` is how chatd's code names an EventLog."""
    match node:
        case ast.Name(id="log") | ast.Attribute(attr="_log"):
            return True
        case ast.Call(func=ast.Name(id="EventLog")):
            return True
    return False


def logged_codes() -> dict[str, set[str]]:
    """The codes of the warning and error records in chatd's code, and their levels.

    A call ``X.warning("name", ...)`` or ``X.error("name", error="code", ...)`` on an
    EventLog (``self._log``, ``log``, ``EventLog(...)``) logs its ``error`` argument as the
    code, or else its event name; the supervisor of ``--workers`` logs its fatal errors
    through ``self._fail("code", ...)``, which passes the code on.
    """
    codes: dict[str, set[str]] = {}
    for path in sorted((ROOT / "chatd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        forwarding = {id(node) for function in ast.walk(tree)
                      if isinstance(function, ast.FunctionDef) and function.name == "_fail"
                      for node in ast.walk(function)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            method, receiver = node.func.attr, node.func.value
            if method == "_fail" and path.name == "workers.py":
                level = "error"
            elif method in ("warning", "error") and _is_event_log(receiver):
                level = method
            else:
                continue
            named = {kw.arg: kw.value for kw in node.keywords}
            code = named.get("error") or (node.args[0] if node.args else None)
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                codes.setdefault(code.value, set()).add(level)
            else:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert id(node) in forwarding, f"{where}: a code that is not a literal"
    return codes


def test_every_warning_and_error_code_is_documented() -> None:
    codes = logged_codes()
    assert {"session_crashed", "rate_limited", "too_many_open_files",
            "worker_start_failed"} <= set(codes)  # the scan sees every kind of call
    documented = {row[0].strip("`"): row[1] for row in _rows("Warning and error codes")}
    missing = sorted(set(codes) - set(documented))
    assert not missing, f"not in docs/operations.md, 'Warning and error codes': {missing}"
    for code, levels in codes.items():
        assert all(level in documented[code] for level in levels), (code, levels)
    stale = sorted(set(documented) - set(codes) - {"log"})
    assert not stale, f"documented but logged nowhere: {stale}"


# -- the acceptance test: one chat with one failure, through a real daemon ----------------


@pytest.mark.slow
async def test_one_chat_with_one_failure_logs_only_documented_records(
        tmp_path: Path) -> None:
    """alice and bob chat (sent, delivered, read); someone fails to log in; alice floods
    and is rate limited (a warning). Every line the daemon writes, from start to a
    graceful stop, is a record of the documented field set."""
    config = tmp_path / "chatd.toml"
    config.write_text("rate_limit = 50.0\nrate_burst = 128\n")
    flood = [(f"flood-{i}", "carol", "flood") for i in range(200)]
    async with serve(tmp_path / "data", "--config", str(config), "--log-level", "debug",
                     graceful=True) as daemon:
        with trio.fail_after(DEADLINE):
            async with connect(daemon.url, daemon.token("alice")) as alice, \
                    connect(daemon.url, daemon.token("bob")) as bob:
                sent = await alice.send("bob", "hello bob")
                async for event in bob.events():
                    if isinstance(event, Msg):
                        await bob.read(event.seq, "alice")
                        break
                async for event in alice.events():
                    if isinstance(event, Receipt) and event.status == "read":
                        assert event.ids == [sent.id]
                        break
                with pytest.raises(ChatError):
                    async with connect(daemon.url, "not-a-token"):
                        pass
                await alice.submit(flood)
                waiting = {msg_id for msg_id, _, _ in flood}
                async for event in alice.events():
                    if isinstance(event, Sent):
                        waiting.discard(event.id)
                        if not waiting:
                            break
                while not daemon.events("rate_limited"):
                    await trio.sleep(0.02)
    for record in daemon.records:
        check_record(record)
    limited = daemon.events("rate_limited")[0]
    assert {k: limited[k] for k in ("log.level", "event.code", "chatd.component",
                                    "user.id", "service.node.name")} == {
        "log.level": "warning", "event.code": "rate_limited", "chatd.component": "session",
        "user.id": "alice", "service.node.name": "node1"}
    refused = [r for r in daemon.events("session_closed") if r["user.id"] == ""]
    assert refused and refused[0]["event.reason"] == "auth_failed", refused
    assert {"listening", "store_recovered", "session_opened", "session_closed",
            "rate_limited", "shutting_down", "stopped"} <= {action(r) for r in daemon.records}
