"""An exclusive lock on a store directory, so that two processes never share one.

A second ``chatd serve`` on the same data directory would otherwise recover the store
while the first one writes it, then answer every send ``store_unavailable``. The lock is an
``flock`` on a file in the directory, which holds the owner's process id; the kernel drops
it when the owner exits, however it exits (SIGKILL included), so there is nothing stale to
clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from chatd.backends._records import BackendUnavailable

__all__ = ["LOCK_FILE", "DirectoryInUse", "DirectoryLock"]

#: The lock file's name inside each replica directory.
LOCK_FILE = "lock"


class DirectoryInUse(BackendUnavailable):
    """Another process holds the directory's lock.

    Args:
        directory: The locked directory.
        pid: The holder's process id, if the lock file says.
    """

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{directory} is in use by {holder}; stop it first, or give this "
                         "node another --data-dir")
        self.directory = directory
        self.pid = pid


class DirectoryLock:
    """The lock of one directory, held by this process from :meth:`acquire` to
    :meth:`release`.

    Args:
        directory: The directory to lock; created if missing.
    """

    __slots__ = ("_fd", "directory")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting and write this process's id into the lock file.

        Raises:
            DirectoryInUse: Another process (or another store in this one) holds it.
            OSError: The directory or its lock file cannot be created.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DirectoryInUse(self.directory,
                                 int(holder) if holder.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means nothing)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
