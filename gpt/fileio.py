"""Crash-safe file writes and file checksums, shared by every writer in the project.

``write_atomic`` writes to a temporary name in the same directory, fsyncs the file, renames it
over the final name and fsyncs the directory, so a kill or power loss leaves either the old
file or the new one whole, never a mixture. This module imports nothing heavy (no torch), so
the data tools can use it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file inside ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` via ``path.tmp`` + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no partial file left behind
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
