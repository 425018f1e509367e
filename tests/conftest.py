"""Shared fixtures: a real node on a loopback port with its data in a temporary directory,
on the embedded engine or on a real nats-server.

A test module runs its nodes on both engines by overriding the ``engine`` fixture with
``params=["embedded", "nats"]``. Nodes on NATS share one nats-server per test session,
each test in a namespace of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from natsservers import NatsServer, nats_server

from chatd.auth import load_or_create_secret, mint_token
from chatd.config import load_config
from chatd.node import Node

_namespaces = itertools.count(1)


class RunningNode:
    """A node started for a test, with helpers to mint tokens for it."""

    def __init__(self, node: Node, secret: bytes) -> None:
        self.node = node
        self.secret = secret

    @property
    def url(self) -> str:
        return self.node.url

    def token(self, user: str, ttl: float = 3600.0) -> str:
        return mint_token(self.secret, user, ttl)

    @property
    def contiguous(self) -> bool:
        """Whether each user's queue is numbered 1, 2, 3... (embedded); on NATS all queues
        share the stream's sequence, so a queue's numbers only grow."""
        return self.node.backend.engine == "embedded"


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for every test of the session that runs a node on NATS."""
    with nats_server(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def engine() -> str:
    """The engine nodes run on; a module overrides this to run on both."""
    return "embedded"


@pytest.fixture
def nats_settings(engine: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``load_config`` overrides that put a node on the shared nats-server, in a namespace
    of this test's own (none for the embedded engine)."""
    if engine != "nats":
        return {}
    server: NatsServer = request.getfixturevalue("shared_nats")
    return {"nats": [server.url], "nats_namespace": f"t{next(_namespaces)}"}


@pytest.fixture
def make_node(tmp_path: Path, nursery: trio.Nursery, nats_settings: dict[str, Any]
              ) -> Callable[..., Any]:
    """Start a node with ``load_config`` overrides; returns a :class:`RunningNode`."""

    async def start(**overrides: Any) -> RunningNode:
        data_dir = overrides.pop("data_dir", tmp_path / "data")
        config = load_config(data_dir=data_dir, port=0, http_listen="127.0.0.1:0",
                             **{**nats_settings, **overrides})
        node = Node(config)
        await nursery.start(node.run)
        return RunningNode(node, load_or_create_secret(config.secret_path))

    return start


@pytest.fixture
async def chat_node(make_node: Callable[..., Any]) -> AsyncIterator[RunningNode]:
    """A node on embedded defaults (port 0)."""
    yield await make_node()
