"""Shared fixtures: a real node on a loopback port with its data in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.auth import load_or_create_secret, mint_token
from chatd.config import load_config
from chatd.node import Node


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


@pytest.fixture
def make_node(tmp_path: Path, nursery: trio.Nursery
              ) -> Callable[..., Any]:
    """Start a node with ``load_config`` overrides; returns a :class:`RunningNode`."""

    async def start(**overrides: Any) -> RunningNode:
        data_dir = overrides.pop("data_dir", tmp_path / "data")
        config = load_config(data_dir=data_dir, port=0, **overrides)
        node = Node(config)
        await nursery.start(node.run)
        return RunningNode(node, load_or_create_secret(config.secret_path))

    return start


@pytest.fixture
async def chat_node(make_node: Callable[..., Any]) -> AsyncIterator[RunningNode]:
    """A node on embedded defaults (port 0)."""
    yield await make_node()
