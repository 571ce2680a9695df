"""One job per run directory: an advisory lock on ``out_dir/LOCK``.

Rank 0 of a job holds an exclusive ``flock`` on the file for as long as the process lives;
the other ranks of the same job share the directory through it. The kernel releases the lock
when the holder dies, however it dies (kill -9, a node crash on a local disk), so a lock left
by a crashed run is never in the way: the next job takes it over and says so. The file also
records the holder (host, pid, start time) so that a refused job can name it.

On network file systems flock is as reliable as the mount makes it (NFS v4 and Lustre with
``-o flock`` honour it across nodes).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK = "LOCK"


class RunLocked(RuntimeError):
    """Another job holds the run directory."""


class RunLock:
    """``acquire()`` or RunLocked naming the holder; released on ``release()`` or exit."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None
        self.previous: dict | None = None  # the holder recorded by a run that ended uncleanly

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            who = (
                f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
                if holder
                else "another process"
            )
            raise RunLocked(
                f"{self.path.parent}: the run directory is in use by another job ({who}); "
                "wait for it to finish, stop it, or choose another train.out_dir"
            ) from None
        self.previous = self._holder(fd) or None  # non-empty: its holder did not release it
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Empty the record (a clean exit leaves no holder behind) and unlock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
