"""Directory walks and glob patterns that follow symlinks but never loop.

``glob.glob(pattern, recursive=True)`` follows a symlinked directory under ``**`` however often
it is reached, so a link to one of its own ancestors makes it run (near enough) forever; two
such links make the work grow as 2^depth before the kernel's 40-link limit stops it. Here a
walk lists each directory once: it is identified by ``(st_dev, st_ino)`` of what it resolves
to (together with how far the pattern has matched, so a directory reached at two places of a
pattern is still matched at both), and a symlinked directory is entered only after the real
directories around it, so that a directory reachable both directly and through a link is read
at its direct path. A link back to an ancestor, or to a directory already read, is skipped.

``glob_files`` matches as ``glob.glob(pattern, recursive=True)`` does: ``*``, ``?`` and
``[...]`` within one path component, ``**`` alone as a component for zero or more
directories, and wildcards do not match names starting with a dot. ``walk_files`` returns
every file below a directory, hidden ones included (as ``Path.rglob("*")``).
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from pathlib import Path

# a walk's matching state: the set of pattern positions reached (walk_files: always {0})
State = frozenset[int]


def _component_matches(name: str, pattern: str) -> bool:
    if not glob.has_magic(pattern):
        return name == pattern
    if name.startswith(".") and not pattern.startswith("."):
        return False  # as glob: a wildcard does not match a hidden name
    return fnmatch.fnmatch(name, pattern)


class _Pattern:
    """A glob pattern's components below its literal root, matched one path component at a
    time: a state is the set of positions in ``parts`` reached so far (an NFA), so ``**`` costs
    nothing however deep the tree."""

    def __init__(self, parts: list[str]):
        self.parts = parts

    def _closure(self, positions) -> State:
        reached, todo = set(positions), list(positions)
        while todo:  # "**" may match zero components: skip over it
            i = todo.pop()
            if i < len(self.parts) and self.parts[i] == "**" and i + 1 not in reached:
                reached.add(i + 1)
                todo.append(i + 1)
        return frozenset(reached)

    def start(self) -> State:
        return self._closure([0])

    def step(self, state: State, name: str) -> State:
        nxt = []
        for i in state:
            if i == len(self.parts):
                continue
            if self.parts[i] == "**":
                if not name.startswith("."):  # as glob: "**" does not enter hidden names
                    nxt.append(i)
            elif _component_matches(name, self.parts[i]):
                nxt.append(i + 1)
        return self._closure(nxt)

    def accepts(self, state: State) -> bool:
        return len(self.parts) in state

    def descends(self, state: State) -> bool:
        return any(i < len(self.parts) for i in state)


class _Everything:
    """The matcher of a plain directory walk: every file, hidden ones too, at any depth."""

    def start(self) -> State:
        return frozenset([0])

    def step(self, state: State, name: str) -> State:
        return state

    def accepts(self, state: State) -> bool:
        return True

    def descends(self, state: State) -> bool:
        return True


def _walk(root: str, matcher: _Pattern | _Everything) -> Iterator[str]:
    """Paths of the files below ``root`` that ``matcher`` accepts; each (directory, matching
    state) is listed once, real directories before symlinked ones."""
    try:
        st = os.stat(root or ".")
    except OSError:
        return
    start = matcher.start()
    seen = {(st.st_dev, st.st_ino, start)}
    links: list[tuple[str, State]] = []  # symlinked directories, entered after the real ones
    stack: list[tuple[str, State]] = [(root, start)]
    while stack or links:
        if not stack:
            path, state = links.pop(0)
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino, state)
            if key in seen:  # a loop back to an ancestor, or a directory already read
                continue
            seen.add(key)
            stack.append((path, state))
        path, state = stack.pop()
        try:
            with os.scandir(path or ".") as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as glob does
            continue
        subdirs = []
        for entry in entries:
            child = os.path.join(path, entry.name) if path else entry.name
            child_state = matcher.step(state, entry.name)
            if not child_state:
                continue
            try:
                is_dir = entry.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if not is_dir:
                try:
                    is_file = entry.is_file()  # False for a dangling symlink
                except OSError:  # a link that loops (ELOOP): listed, so its reader names it
                    is_file = True
                if matcher.accepts(child_state) and is_file:
                    yield child
            elif matcher.descends(child_state):
                if entry.is_symlink():
                    links.append((child, child_state))
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino, child_state)
                if key not in seen:  # a bind mount can loop without a symlink
                    seen.add(key)
                    subdirs.append((child, child_state))
        stack.extend(reversed(subdirs))  # depth first, in name order


def walk_files(root: str | Path) -> list[Path]:
    """Every file below directory ``root`` (hidden ones too), following symlinked directories
    but listing each directory once; sorted as paths, as ``sorted(Path(root).rglob("*"))``."""
    return sorted(Path(p) for p in _walk(str(root), _Everything()))


def glob_files(pattern: str) -> list[Path]:
    """The files matching ``pattern`` as ``glob.glob(pattern, recursive=True)`` would, except
    that each directory is listed once (a symlink loop ends); sorted as strings, as
    ``sorted(glob.glob(...))``."""
    head, parts = "", pattern.split(os.sep)
    if pattern.startswith(os.sep):
        head, parts = os.sep, pattern.lstrip(os.sep).split(os.sep)
    parts = [p for p in parts if p]
    literal = 0  # the leading components without wildcards are the walk's root
    while literal < len(parts) and not glob.has_magic(parts[literal]):
        literal += 1
    root = os.path.join(head, *parts[:literal]) if head or literal else ""
    matcher = _Pattern(parts[literal:])
    if not matcher.parts:
        return [Path(root)] if os.path.isfile(root) else []
    if root and not os.path.isdir(root):
        return []
    return [Path(p) for p in sorted(_walk(root, matcher))]
