"""Blobs of the embedded engine: files on both replica directories, or process memory.

:class:`FileBlobs` writes a blob to a temporary file in each replica's ``blobs``
directory as the bytes arrive, computing its SHA-256 on the way, fsyncs both, renames them
into place and fsyncs the directories; only then does it record the blob's size and hash
in a durable state bucket, which is what :meth:`FileBlobs.info` reads. A read takes the
first replica that has the file. :class:`MemoryBlobs` keeps blobs in memory, for the
memory store.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import cbor2
import trio

from chatd.backends._interfaces import Bucket
from chatd.backends._records import BlobInfo, BlobNotFound, StoreUnavailable

__all__ = ["CHUNK_BYTES", "FileBlobs", "MemoryBlobs", "check_blob_name"]

#: Bytes per chunk when a blob is read.
CHUNK_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_blob_name(name: str) -> None:
    """Refuse a name that is not 1-128 of ``A-Z a-z 0-9 . _ -``, not starting with ``.``.

    Raises:
        ValueError: It is not.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad blob name {name!r}")


class MemoryBlobs:
    """Blobs in process memory, lost on stop."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    async def put(self, name: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Store a blob; see :meth:`chatd.backends.Blobs.put`."""
        check_blob_name(name)
        data = b"".join([chunk async for chunk in chunks])
        self._blobs[name] = data
        return BlobInfo(name, len(data), hashlib.sha256(data).hexdigest())

    async def get(self, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes; see :meth:`chatd.backends.Blobs.get`."""
        data = self._blobs.get(name)
        if data is None:
            raise BlobNotFound(name)
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start:start + CHUNK_BYTES]

    async def info(self, name: str) -> BlobInfo | None:
        """What is known of the blob; see :meth:`chatd.backends.Blobs.info`."""
        data = self._blobs.get(name)
        return None if data is None else BlobInfo(name, len(data),
                                                  hashlib.sha256(data).hexdigest())

    async def delete(self, name: str) -> bool:
        """Remove the blob; see :meth:`chatd.backends.Blobs.delete`."""
        return self._blobs.pop(name, None) is not None


class FileBlobs:
    """Blobs as files on the durable store's two replica directories.

    Args:
        directories: The replica directories; blobs go to ``blobs`` inside each.
        meta: A durable bucket for the blobs' sizes and hashes.
    """

    def __init__(self, directories: Sequence[Path], meta: Bucket) -> None:
        self._dirs = [Path(d) / "blobs" for d in directories]
        self._meta = meta

    async def put(self, name: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Store a blob on both replicas; see :meth:`chatd.backends.Blobs.put`."""
        check_blob_name(name)
        temp = f".tmp-{secrets.token_hex(8)}"
        files = []
        digest = hashlib.sha256()
        size = 0
        try:
            for directory in self._dirs:
                await trio.to_thread.run_sync(functools.partial(
                    directory.mkdir, parents=True, exist_ok=True))
                files.append(await trio.open_file(directory / temp, "wb"))
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                for file in files:
                    await file.write(chunk)
            for file in files:
                await file.flush()
                await trio.to_thread.run_sync(os.fsync, file.fileno())
            for file in files:
                await file.aclose()
            for directory in self._dirs:
                await trio.to_thread.run_sync(_publish, directory, temp, name)
        except OSError as exc:
            raise StoreUnavailable(f"blob {name} not stored: {exc.strerror}") from exc
        finally:
            for file in files:
                await file.aclose()
            for directory in self._dirs:
                (directory / temp).unlink(missing_ok=True)
        info = BlobInfo(name, size, digest.hexdigest())
        await self._meta.put(name, cbor2.dumps([size, info.sha256]))
        return info

    async def get(self, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes from the first replica that has it; see
        :meth:`chatd.backends.Blobs.get`."""
        check_blob_name(name)
        if await self._meta.get(name) is None:
            raise BlobNotFound(name)
        for directory in self._dirs:
            try:
                file = await trio.open_file(directory / name, "rb")
            except OSError:
                continue
            async with file:
                while chunk := await file.read(CHUNK_BYTES):
                    yield chunk
            return
        raise BlobNotFound(name)

    async def info(self, name: str) -> BlobInfo | None:
        """The blob's size and hash; see :meth:`chatd.backends.Blobs.info`."""
        record = await self._meta.get(name)
        if record is None:
            return None
        size, sha256 = cbor2.loads(record.value)
        return BlobInfo(name, size, sha256)

    async def delete(self, name: str) -> bool:
        """Remove the blob from both replicas; see :meth:`chatd.backends.Blobs.delete`."""
        check_blob_name(name)
        if await self._meta.get(name) is None:
            return False
        await self._meta.delete(name)
        for directory in self._dirs:
            await trio.to_thread.run_sync(functools.partial((directory / name).unlink,
                                                            missing_ok=True))
        return True


def _publish(directory: Path, temp: str, name: str) -> None:
    """Rename the temporary file into place and make the rename durable."""
    os.replace(directory / temp, directory / name)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
