"""Blobs on NATS: the JetStream object store ``NS_blobs``.

nats-py's object store reads from and writes to files, so a blob passes through a
temporary file on its way in and out; memory stays bounded whatever its size.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import trio

from chatd.backends._records import BlobInfo
from chatd.backends.embedded._blobs import CHUNK_BYTES, check_blob_name

from ._bridge import NatsBridge
from ._names import Names

__all__ = ["NatsBlobs"]


class NatsBlobs:
    """Blobs in the object store (see :class:`chatd.backends.Blobs`).

    Args:
        bridge: The node's NATS connection.
        names: Where the object store is.
    """

    def __init__(self, bridge: NatsBridge, names: Names) -> None:
        self._bridge = bridge
        self._bucket = names.objects

    async def put(self, name: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Store a blob; see :meth:`chatd.backends.Blobs.put`."""
        check_blob_name(name)
        with tempfile.TemporaryDirectory(prefix="chatd-blob-") as directory:
            path = Path(directory) / "blob"
            async with await trio.open_file(path, "wb") as file:
                async for chunk in chunks:
                    await file.write(chunk)
            return await self._bridge.object_put(self._bucket, name, path)

    async def get(self, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes; see :meth:`chatd.backends.Blobs.get`."""
        check_blob_name(name)
        with tempfile.TemporaryDirectory(prefix="chatd-blob-") as directory:
            path = Path(directory) / "blob"
            await self._bridge.object_get(self._bucket, name, path)
            async with await trio.open_file(path, "rb") as file:
                while chunk := await file.read(CHUNK_BYTES):
                    yield chunk

    async def info(self, name: str) -> BlobInfo | None:
        """What is known of the blob; see :meth:`chatd.backends.Blobs.info`."""
        check_blob_name(name)
        return await self._bridge.object_info(self._bucket, name)

    async def delete(self, name: str) -> bool:
        """Remove the blob; see :meth:`chatd.backends.Blobs.delete`."""
        check_blob_name(name)
        return await self._bridge.object_delete(self._bucket, name)
