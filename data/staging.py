"""Replace a data set folder only by a complete one: build it beside DIR, swap on success.

`prepare` writes the new data set into `.NAME.prepare-new`, a sibling of DIR (same file
system, so a rename moves it), with every file and the folder fsynced, then swaps it with DIR:
in one atomic `renameat2(RENAME_EXCHANGE)` on Linux, else with two renames (DIR to
`.NAME.prepare-old`, the new one to DIR). DIR therefore always holds a complete data set, the
old one or the new one; only a kill in the instant between the two fallback renames leaves it
missing, and the next run renames `.NAME.prepare-old` back first thing.

A lock file `.NAME.prepare.lock` (flock, released by the kernel when its holder dies) keeps
two prepares off one DIR. Whoever holds it owns every `.NAME.prepare-*` sibling, so the
leftovers of a killed run are removed by the next one.
"""

import ctypes
import errno
import fcntl
import os
import shutil
import socket
import sys
from pathlib import Path

from gpt.data.shards import MANIFEST, read_manifest
from gpt.fileio import fsync_dir

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. NFS
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that are not the manifest or a shard it lists (all of them if no valid
    manifest): files `prepare` did not write."""
    names = sorted(p.name for p in out.iterdir())
    try:
        manifest = read_manifest(out)
    except ValueError:
        return names
    ours = {MANIFEST} | {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    return [n for n in names if n not in ours]


class Staging:
    """`with Staging(out) as stage:` write into `stage.path`, then `stage.commit()`.

    Entering takes the lock, repairs or removes what a killed run left, and checks that `out`
    may be replaced; leaving without `commit()` removes the partial data set, leaving `out`
    as it was. `inputs` are the source files: `overwrite` never deletes one of them.
    """

    def __init__(self, out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
        self.out = Path(out).resolve()
        self.overwrite, self.inputs = overwrite, inputs
        stem = f".{self.out.name}.prepare"
        self.path = self.out.with_name(stem + "-new")
        self._old = self.out.with_name(stem + "-old")
        self._lock_path = self.out.with_name(stem + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "Staging":
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a directory")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except PermissionError as e:
            raise ValueError(
                f"--out {self.out}: cannot write in {self.out.parent} ({e.strerror}); prepare "
                "builds the new data set beside DIR, so DIR's parent must be writable"
            ) from e
        try:
            self._recover()
            self._check_destination()
            self.path.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._recover()  # after a failure: DIR back in place, partial data set removed
        finally:
            self._unlock()

    def commit(self) -> None:
        """Make the data set in `self.path` durable and put it at `out` (the old one goes)."""
        fsync_dir(self.path)
        if not self.out.exists() or not any(self.out.iterdir()):
            os.rename(self.path, self.out)  # rename(2) replaces an empty folder
        elif not exchange(self.path, self.out):
            os.rename(self.out, self._old)
            os.rename(self.path, self.out)
        # After an exchange the old data set is at self.path; _recover removes it on exit.
        fsync_dir(self.out.parent)

    def _recover(self) -> None:
        if self._old.exists():
            if self.out.exists():  # killed after the swap, before the clean-up
                shutil.rmtree(self._old, ignore_errors=True)
            else:
                os.rename(self._old, self.out)  # killed between the two renames
                fsync_dir(self.out.parent)
        shutil.rmtree(self.path, ignore_errors=True)

    def _check_destination(self) -> None:
        if not self.out.is_dir():
            return
        # DIR is replaced as a whole: never with the shell, the corpus or a home inside it.
        cwd = Path.cwd().resolve()
        if cwd == self.out or self.out in cwd.parents:
            raise ValueError(
                f"--out {self.out} contains the current directory, and prepare replaces DIR as "
                "a whole; run it from elsewhere"
            )
        foreign = foreign_entries(self.out)
        if foreign and not self.overwrite:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" * (len(foreign) > 5))
            raise ValueError(
                f"--out {self.out} holds files prepare did not write ({shown}); choose another "
                f"--out, or pass --overwrite to replace {self.out} and everything in it"
            )
        for path in self.inputs:
            if self.out in Path(path).resolve().parents:
                raise ValueError(
                    f"source {path} lies inside --out {self.out}, which --overwrite would "
                    "delete; choose another --out"
                )
        home = Path.home().resolve()
        if home == self.out or self.out in home.parents:
            raise ValueError(f"--out {self.out} contains your home; refusing to --overwrite it")

    def _lock(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"another prepare ({holder}) is writing {self.out}; wait for it to finish "
                    f"(a lock is never stale: it goes with its process)"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                # A file system without locks: go on unlocked (only concurrent runs clash).
            # Its previous holder may have unlinked the file after we opened it: only the file
            # that is at the path now counts.
            try:
                current = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._fd is not None:
            self._lock_path.unlink(missing_ok=True)  # before closing: no one else holds it yet
            os.close(self._fd)
            self._fd = None
