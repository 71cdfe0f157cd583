"""One broker per data directory.

Two brokers on one SQLite store would each count stream seqs in memory and hand out the
same ones; the first then finds its own write refused and stops. So the broker holds an
exclusive lock on `broker.lock` in its data directory for as long as it runs. The kernel
drops the lock when the process dies, even by `kill -9`, so a crashed broker never
blocks its restart. The admin command `--release-name` takes no lock: it is one short
SQLite transaction, which SQLite itself serialises.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = "broker.lock"


class DataDirInUse(Exception):
    """Another running broker holds the data directory."""


class DataDirLock:
    """Held from `acquire()` until `release()`, or until this object is collected (its
    file closes with it: `main()` keeps it in a local, so the lock lasts exactly as long
    as the broker runs, on every way out of `main()`)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file: BinaryIO | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `DataDirInUse` naming the holder's process id."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        lock_file = os.fdopen(fd, "r+b", buffering=0)
        if not _try_lock(fd):
            holder = lock_file.read(32).decode("ascii", "replace").strip() or "unknown"
            lock_file.close()
            raise DataDirInUse(
                f"{self.path.parent} is in use by another broker (process {holder}); stop it"
                " first, or give this broker a --data directory of its own"
            )
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n".encode("ascii"))
        self._file = lock_file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        # A byte far past the pid, so reading the holder's pid is not blocked by it.
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True
