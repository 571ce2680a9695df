"""Loop-safe globbing (gpt.data.globbing): the same files as glob.glob on trees without links
(many patterns), and on trees with symlink loops an answer within a deadline, each file once,
at its direct path."""

import glob
import os
import random
from pathlib import Path

import pytest
from deadline import deadline

from gpt.data.globbing import glob_files, walk_files


def looped_tree(root: Path) -> Path:
    """d/sub/a.txt, d/other/b.txt, d/.hidden/c.txt, and links: d/sub/up -> .. (an ancestor),
    d/sub/self -> . (itself), d/sub/side -> ../other, d/alias -> sub (a directory read
    directly too), d/other/top -> ../.. (above the walk's root)."""
    d = root / "d"
    for sub in ("sub", "other", ".hidden"):
        (d / sub).mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("a")
    (d / "other" / "b.txt").write_text("b")
    (d / ".hidden" / "c.txt").write_text("c")
    os.symlink("..", d / "sub" / "up")
    os.symlink(".", d / "sub" / "self")
    os.symlink("../other", d / "sub" / "side")
    os.symlink("sub", d / "alias")
    os.symlink("../..", d / "other" / "top")
    return d


def test_glob_on_a_symlink_loop_ends_with_each_file_once_at_its_direct_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    looped_tree(tmp_path)
    with deadline(20):
        assert glob_files("d/**/*.txt") == [Path("d/other/b.txt"), Path("d/sub/a.txt")]
        assert glob_files("d/**/a.txt") == [Path("d/sub/a.txt")]  # not d/alias/a.txt
        assert glob_files(str(tmp_path / "d/**/b.txt")) == [tmp_path / "d/other/b.txt"]
        assert glob_files("d/.hidden/**/*.txt") == [Path("d/.hidden/c.txt")]
        assert walk_files("d") == [Path(p) for p in ("d/.hidden/c.txt", "d/other/b.txt",
                                                     "d/sub/a.txt")]  # fmt: skip
        # d/other is read as d/*/ and again, through d/sub/side, as d/*/*/ (another place in
        # the pattern); d/alias/side/b.txt is not listed: d/alias is d/sub, read directly
        assert glob_files("d/*/*/b.txt") == [Path("d/sub/side/b.txt")]


def test_a_directory_reached_only_through_a_link_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("x")
    (tmp_path / "d").mkdir()
    os.symlink("../elsewhere", tmp_path / "d" / "link")
    os.symlink("../d", tmp_path / "elsewhere" / "back")  # and a loop through both
    with deadline(20):
        assert glob_files("d/**/*.txt") == [Path("d/link/x.txt")]
        assert walk_files("d") == [Path("d/link/x.txt")]


def test_glob_matches_glob_glob_on_trees_without_links(tmp_path, monkeypatch):
    """The reference is the standard library's glob.glob(recursive=True), files only; it can
    repeat a file (``**/**``), so the sets are compared, and our order is sorted(strings)."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    for _ in range(120):
        parts = [rng.choice(["a", "b", ".h", "sub"]) for _ in range(rng.randint(0, 3))]
        folder = Path("t", *parts)
        if any(p.is_file() for p in [folder, *folder.parents]):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        name = folder / rng.choice(["ab.txt", "c.md", ".x.txt", "x.txt", "a", "[b].txt"])
        if not name.is_dir():
            name.write_text("x")
    patterns = [
        "t/**/*.txt", "t/*/*.txt", "t/**", "t/**/a/**/*.txt", "t/.h/**/*", "t/**/.x.txt",
        "t/*/**/x.txt", "**/*.md", "t/[ab]/*", "t/?/**/ab.txt", "t/**/**/x.txt", "t/*/.h/*",
        "t/a/../b/*.txt", "t/**/[[]b].txt", "*/sub/*", str(tmp_path / "t" / "**" / "*.md"),
    ]  # fmt: skip
    for pattern in patterns:
        reference = sorted({p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
        assert [str(p) for p in glob_files(pattern)] == reference, pattern
        assert reference or pattern == "t/**/[[]b].txt", f"{pattern} tests nothing"
    reference = sorted(p for p in Path("t").rglob("*") if p.is_file())
    assert walk_files("t") == reference and len(reference) > 20


def test_patterns_that_match_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    assert glob_files("missing/**/*.txt") == []
    assert glob_files("f.txt/*") == []
    assert glob_files("f.txt") == [Path("f.txt")]
    assert glob_files("*.md") == []
    with pytest.raises(TimeoutError):  # the deadline itself works
        with deadline(0.2):
            while True:
                pass
