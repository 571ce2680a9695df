"""Crash-safe file writes and file checksums, shared by every writer in the project.

``write_atomic`` writes to a temporary name in the same directory, fsyncs the file, renames it
over the final name and fsyncs the directory, so a kill or power loss leaves either the old
file or the new one whole, never a mixture. This module imports nothing heavy (no torch), so
the data tools can use it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
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


def write_output(path: str | Path, data: bytes | str) -> None:
    """Write a file a user named on the command line (``--out``): atomically, but a symbolic
    link is written through (its target replaced, the link kept) and a path that is not a
    regular file (``/dev/null``, a FIFO) is written to directly, where renaming over it would
    replace the device itself. Files the tools write into their own directories go through
    ``write_atomic``, which never follows a link."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # through links: /dev/stdout is a link to a pipe
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        with open(path, "wb") as f:  # the path as given: /proc/self/fd/1 -> pipe:[N] is not
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return
    write_atomic(path.resolve() if path.is_symlink() else path, data)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` via ``path.tmp`` + rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
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


def write_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out a matplotlib ``fig``, write it as a PNG to ``path`` (as ``write_output``) and
    close it; ``path``."""
    import io

    import matplotlib.pyplot as plt  # here: this module imports nothing heavy

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    write_output(path, png.getvalue())
    return Path(path)


def plot_beside(out: str | Path | None) -> str | None:
    """The default ``--plot`` of a command given ``--out``: the same name with ``.png``, beside
    a regular (or new) file only (never ``/dev/null.png``, nor inside a directory)."""
    if not out:
        return None
    path = Path(out)
    return str(path.with_suffix(".png")) if path.is_file() or not path.exists() else None
