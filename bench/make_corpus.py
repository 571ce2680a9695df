"""Write a corpus of a given size in every format prepare reads, the same documents in each.

    python bench/make_corpus.py --size 2GB --out out/bench-corpus-2gb --formats jsonl parquet
    python bench/make_corpus.py --size 100MB --out out/bench-corpus-100mb

Formats (one folder each under --out; files of about --file-size of text each, numbered so
that sorted order is the order written):

    jsonl/    corpus-00000.jsonl         {"text": ..., "id": ..., "url": ...} per line, UTF-8
    parquet/  corpus-00000.parquet       columns text, id, url, language_score; row groups of
                                         --row-group-rows rows (1,000: what Hugging Face's
                                         `datasets` writes, and FineWeb's files hold ~1,000)
    zst/      corpus-00000.jsonl.zst     the JSONL bytes, zstd level 3, one frame per file
    txt/      000000/000000000.txt       one document per file, 1,000 files per folder (the
                                         layout of OpenWebText's original .txt subsets)

Documents are cut from the cached recipe corpora (`gpt.data.recipes`; fetched once, at
set-up time, as `python -m gpt.data.assets` does): a document is a span of one source text
that starts at a line drawn at random (uniform over all lines of all sources) and runs for a
length drawn from a log-normal distribution (median 3,000 characters, sigma 1: mean 4.9 KB,
OpenWebText's 39.8 GB over 8.0 M documents), ended at the next space or line break (or the
source's end). A span equal to an earlier document as `prepare --dedup` compares them
(rare: a span reaching the end of a short source) is drawn again: `--dedup` removes nothing.
The seed fixes every draw: the same arguments give the same bytes.

Memory is bounded by the source texts (~25 MB with the default recipes), one row group of
documents and an 8-byte hash per document (~40 MB at 2 GB): every format is written as a
stream. The summary (documents, text bytes, files) is written to OUT/corpus.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shlex
import sys
import time
from array import array
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.data.prepare import normalise  # noqa: E402
from gpt.data.recipes import RECIPES, fetch_recipe  # noqa: E402

FORMATS = ("jsonl", "parquet", "zst", "txt")
# Hash-verified recipes only, so the corpus is the same on every machine (pystdlib depends on
# the interpreter's version).
DEFAULT_RECIPES = ("shakespeare", "austen", "kjv", "pydocs")
MEDIAN_CHARS, SIGMA = 3000, 1.0
MAX_CHARS = 200_000
TXT_PER_FOLDER = 1000
ZSTD_LEVEL = 3
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as disk sizes are quoted)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 100MB, 500000)")
    return int(float(match[1]) * UNITS[match[2]])


class Sources:
    """The source texts, one string each, and where their lines start."""

    def __init__(self, recipes: list[str]):
        self.texts: list[str] = []
        self.names: list[str] = []
        starts = array("q")  # global line starts: text index * 2**40 + offset
        for name in recipes:
            fetch_recipe(name)  # set-up time: a no-op when cached and verified
            for i, doc in enumerate(RECIPES[name].documents()):
                # The text format reads \r as \n and a NUL means a binary file: the same
                # documents in every format need neither.
                doc = doc.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
                if not doc.strip():
                    continue
                index = len(self.texts)
                self.texts.append(doc)
                self.names.append(f"{name}/{i}")
                starts.append(index << 40)
                starts.extend((index << 40) + m.end() for m in re.finditer("\n", doc))
        self.starts = starts

    def span(self, rng: random.Random) -> tuple[str, str]:
        """(document, its url): a span from a random line start, of log-normal length."""
        while True:
            key = self.starts[rng.randrange(len(self.starts))]
            index, start = key >> 40, key & ((1 << 40) - 1)
            text = self.texts[index]
            length = min(int(rng.lognormvariate(math.log(MEDIAN_CHARS), SIGMA)), MAX_CHARS)
            end = start + max(length, 1)
            if end < len(text):  # end at the next space or line break
                ends = [i for i in (text.find(" ", end), text.find("\n", end)) if i >= 0]
                end = min(ends, default=len(text))
            doc = text[start:end]
            if doc.strip():
                return doc, f"https://example.org/{self.names[index]}#{start}-{end}"


class Writers:
    """One streaming writer per format, each rolling over to a new file every `file_bytes`
    of text (at a row-group boundary)."""

    def __init__(self, out: Path, formats: list[str], file_bytes: int):
        self.out, self.formats, self.file_bytes = out, formats, file_bytes
        self.file_index, self.in_file, self.txt_count = -1, 0, 0
        self.jsonl = self.zst = self.parquet = None
        self.files: list[Path] = []
        for fmt in formats:
            (out / fmt).mkdir(parents=True, exist_ok=True)

    def _roll(self) -> None:
        self._close_files()
        self.file_index += 1
        self.in_file = 0
        stem = f"corpus-{self.file_index:05d}"
        if "jsonl" in self.formats:
            self.jsonl = self._open(self.out / "jsonl" / f"{stem}.jsonl")
        if "zst" in self.formats:
            raw = self._open(self.out / "zst" / f"{stem}.jsonl.zst")
            self.zst = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw)
        if "parquet" in self.formats:
            path = self.out / "parquet" / f"{stem}.parquet"
            self.files.append(path)
            self.parquet = pq.ParquetWriter(path, SCHEMA)

    def _open(self, path: Path):
        self.files.append(path)
        return open(path, "wb")

    def _close_files(self) -> None:
        for f in (self.jsonl, self.zst, self.parquet):
            if f is not None:
                f.close()
        self.jsonl = self.zst = self.parquet = None

    def write(self, rows: list[dict], text_bytes: int) -> None:
        if self.file_index < 0 or self.in_file >= self.file_bytes:
            self._roll()
        self.in_file += text_bytes
        if self.jsonl is not None or self.zst is not None:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
            for f in (self.jsonl, self.zst):
                if f is not None:
                    f.write(lines)
        if self.parquet is not None:
            self.parquet.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        if "txt" in self.formats:
            for row in rows:
                folder = self.out / "txt" / f"{self.txt_count // TXT_PER_FOLDER:06d}"
                if self.txt_count % TXT_PER_FOLDER == 0:
                    folder.mkdir(exist_ok=True)
                (folder / f"{self.txt_count:09d}.txt").write_bytes(row["text"].encode())
                self.txt_count += 1

    def close(self) -> None:
        self._close_files()


SCHEMA = pa.schema(
    [("text", pa.string()), ("id", pa.string()), ("url", pa.string()),
     ("language_score", pa.float64())]
)  # fmt: skip


def make_corpus(
    out: Path,
    size: int,
    formats: list[str],
    recipes: list[str],
    seed: int = 0,
    row_group_rows: int = 1000,
    file_bytes: int = 10**9,
) -> dict:
    """Write the corpus (module docstring) and OUT/corpus.json; returns the summary."""
    for fmt in formats:
        if (out / fmt).exists() and any((out / fmt).iterdir()):
            raise ValueError(f"{out / fmt} is not empty: choose another --out or delete it")
    sources = Sources(recipes)
    rng = random.Random(seed)
    writers = Writers(out, formats, file_bytes)
    documents = text_bytes = redrawn = 0
    seen: set[bytes] = set()
    start = shown = time.perf_counter()
    try:
        while text_bytes < size:
            rows, batch_bytes = [], 0
            while len(rows) < row_group_rows and text_bytes + batch_bytes < size:
                while True:  # a span equal to an earlier one, as --dedup compares, is redrawn
                    text, url = sources.span(rng)
                    key = hashlib.blake2b(normalise(text).encode(), digest_size=8).digest()
                    if key not in seen:
                        break
                    redrawn += 1
                seen.add(key)
                uid = f"<urn:uuid:{rng.getrandbits(128):032x}>"
                rows.append({"text": text, "id": uid, "url": url,
                             "language_score": round(0.65 + 0.35 * rng.random(), 4)})  # fmt: skip
                batch_bytes += len(text.encode())
            writers.write(rows, batch_bytes)
            documents += len(rows)
            text_bytes += batch_bytes
            if time.perf_counter() - shown > 2:
                shown = time.perf_counter()
                print(f"\r{text_bytes / 1e6:,.0f} / {size / 1e6:,.0f} MB", end="", flush=True)
    finally:
        writers.close()
    print(f"\r{text_bytes / 1e6:,.0f} MB in {time.perf_counter() - start:.0f} s" + " " * 20)
    files = {fmt: [] for fmt in formats}
    for path in writers.files:
        files[path.parent.name].append(
            {"file": str(path.relative_to(out)), "bytes": path.stat().st_size}
        )
    if "txt" in formats:
        files["txt"] = [{"files": documents, "folders": -(-documents // TXT_PER_FOLDER)}]
    summary = {
        "documents": documents,
        "text_bytes": text_bytes,
        "redrawn_repeats": redrawn,
        "seed": seed,
        "recipes": recipes,
        "source_texts": len(sources.texts),
        "source_bytes": sum(len(t.encode()) for t in sources.texts),
        "row_group_rows": row_group_rows,
        "file_text_bytes": file_bytes,
        "files": files,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/make_corpus.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=parse_size, required=True, help="text bytes, e.g. 2GB")
    parser.add_argument("--out", type=Path, required=True, help="corpus folder")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=DEFAULT_RECIPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row-group-rows", type=int, default=1000, help="Parquet rows per group")
    parser.add_argument(
        "--file-size", type=parse_size, default=10**9, help="text bytes per file (about)"
    )
    args = parser.parse_args()
    try:
        summary = make_corpus(
            args.out,
            args.size,
            args.formats,
            list(args.recipes),
            seed=args.seed,
            row_group_rows=args.row_group_rows,
            file_bytes=args.file_size,
        )
    except ValueError as e:
        parser.error(str(e))
    summary = {"command": shlex.join(["python", *sys.argv]), **summary}
    (args.out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{summary['documents']:,} documents, {summary['text_bytes']:,} bytes of text "
        f"(no two equal; {summary['redrawn_repeats']:,} repeats drawn again) in "
        f"{', '.join(args.formats)}: {args.out / 'corpus.json'}"
    )


if __name__ == "__main__":
    main()
