"""The binary token shard format, its writer, its validating reader, and the manifest.

A shard is a 64-byte little-endian header followed by the tokens (in the spirit of llm.c's
`.bin` shards, with a checksum and the encoding name added):

    offset size  field
    0      8     magic, the ASCII bytes b"GPTSHARD"
    8      4     uint32 format version (1)
    12     4     uint32 bytes per token: 2 (uint16) or 4 (uint32)
    16     8     uint64 token count N
    24     4     uint32 CRC-32 of the payload bytes (zlib.crc32: IEEE 802.3, as gzip and PNG)
    28     4     uint32 vocabulary size of the encoding (every token is below it)
    32     32    encoding name, ASCII, padded with NUL bytes
    64     N*b   the tokens, little-endian unsigned integers of b bytes each

`DIR/manifest.json` lists the shards of each split in order; a split is the concatenation of
its shards. Files are written under a temporary name and renamed when complete, and the
manifest is written last, so a killed run never leaves a complete-looking but corrupt file.

Every reading error is a one-line ValueError naming the file, what is wrong, and what to do
(re-run the `command` the manifest records, or `python -m gpt.data.prepare`).
"""

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt.fileio import fsync_dir, write_atomic

MAGIC = b"GPTSHARD"
VERSION = 1
HEADER = struct.Struct("<8sIIQII32s")
HEADER_SIZE = 64
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt-pretrain-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
CRC_HEX = re.compile(r"[0-9a-f]{8}")
assert HEADER.size == HEADER_SIZE, "header layout must stay 64 bytes"


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32 (always little-endian)."""
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardHeader:
    version: int
    itemsize: int
    count: int
    crc32: int
    n_vocab: int
    encoding: str


def pack_header(header: ShardHeader) -> bytes:
    name = header.encoding.encode("ascii")
    assert len(name) <= 32, f"encoding name {header.encoding!r} longer than 32 bytes"
    return HEADER.pack(
        MAGIC, header.version, header.itemsize, header.count, header.crc32, header.n_vocab, name
    )


class ShardWriter:
    """Writes one split as consecutive shards `{split}_{index:06d}.bin` of `shard_tokens` each.

    Only the last shard of a split is shorter. `close()` returns the manifest entries.
    """

    def __init__(
        self, out_dir: Path, split: str, encoding: str, n_vocab: int, shard_tokens: int
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.split, self.encoding = Path(out_dir), split, encoding
        self.n_vocab, self.shard_tokens = n_vocab, shard_tokens
        self.dtype = token_dtype(n_vocab)
        self.entries: list[dict] = []
        self._file = None

    def _open(self) -> None:
        self._path = self.out_dir / f"{self.split}_{len(self.entries):06d}.bin"
        self._tmp = self._path.with_name(self._path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(bytes(HEADER_SIZE))  # placeholder until count and CRC are known
        self._count, self._crc = 0, 0

    def _finish(self) -> None:
        header = ShardHeader(
            VERSION, self.dtype.itemsize, self._count, self._crc, self.n_vocab, self.encoding
        )
        self._file.seek(0)
        self._file.write(pack_header(header))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._path)
        fsync_dir(self.out_dir)
        self.entries.append(
            {"file": self._path.name, "tokens": self._count, "crc32": f"{self._crc:08x}"}
        )

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (any integer array) to the split, starting new shards as they fill."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._count)
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._crc = zlib.crc32(data, self._crc)
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.entries


def remedy(data_dir: Path, manifest: dict | None = None) -> str:
    """What to do about a damaged data set: re-run the command that made it, when known."""
    command = manifest.get("command") if isinstance(manifest, dict) else None
    if isinstance(command, str) and command:
        return f"re-run `{command}`"
    return f"re-create it with `python -m gpt.data.prepare SOURCE... --out {data_dir}`"


def read_header(path: Path, fix: str | None = None) -> ShardHeader:
    """Parse and check a shard's header and file size; ValueError naming the file if bad.

    `fix` ends every message (default: how to re-create the shard's folder).
    """
    path = Path(path)
    fix = fix or remedy(path.parent)
    if not path.is_file():
        raise ValueError(f"shard {path} does not exist; {fix}")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ValueError(
            f"shard {path}: {len(raw)} bytes, shorter than the 64-byte header: truncated; {fix}"
        )
    magic, version, itemsize, count, crc, n_vocab, name = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"shard {path}: bad magic {magic!r}, expected {MAGIC!r}; {fix}")
    if version != VERSION:
        raise ValueError(
            f"shard {path}: format version {version}, this reader reads {VERSION}; {fix}"
        )
    if itemsize not in (2, 4):
        raise ValueError(f"shard {path}: bytes per token {itemsize}, expected 2 or 4; {fix}")
    expected = HEADER_SIZE + count * itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(
            f"shard {path}: file is {size} bytes, expected {expected} (64-byte header + "
            f"{count} tokens x {itemsize} bytes): truncated or overwritten; {fix}"
        )
    encoding = name.rstrip(b"\0").decode("ascii", errors="replace")
    return ShardHeader(version, itemsize, count, crc, n_vocab, encoding)


def open_shard(path: Path, verify: str = "full", fix: str | None = None) -> np.ndarray:
    """Validate a shard and memory-map its tokens (read-only, shape (N,)).

    verify="full" checks the CRC-32 and that every token is below the vocabulary size;
    verify="sample" only checks up to 65,536 evenly spaced tokens (for very large data sets).
    """
    if verify not in ("full", "sample"):
        raise ValueError(f"verify must be 'full' or 'sample', got {verify!r}")
    fix = fix or remedy(Path(path).parent)
    header = read_header(path, fix)
    dtype = np.dtype("<u2") if header.itemsize == 2 else np.dtype("<u4")
    if header.count == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))
    if verify == "full":
        crc, biggest = 0, 0
        for start in range(0, header.count, 1 << 22):
            chunk = tokens[start : start + (1 << 22)]
            crc = zlib.crc32(memoryview(np.ascontiguousarray(chunk)).cast("B"), crc)
            biggest = max(biggest, int(chunk.max()))
        if crc != header.crc32:
            raise ValueError(
                f"shard {path}: payload CRC-32 {crc:08x} does not match header "
                f"{header.crc32:08x}: the file is corrupt; {fix}"
            )
    else:
        picks = np.linspace(0, header.count - 1, num=min(header.count, 1 << 16)).astype(np.int64)
        biggest = int(tokens[picks].max())
    if biggest >= header.n_vocab:
        raise ValueError(
            f"shard {path}: token id {biggest} >= vocabulary size {header.n_vocab} "
            f"of encoding {header.encoding!r}; {fix}"
        )
    return tokens


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write DIR/manifest.json atomically (it is the last file a run writes)."""
    write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: object) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return f"not a JSON object but {type(manifest).__name__}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"version {manifest.get('version')!r}, this reader reads {MANIFEST_VERSION}"
    for key in ("encoding", "n_vocab", "eot", "splits"):
        if key not in manifest:
            return f"missing key {key!r}"
    if not isinstance(manifest["encoding"], str):
        return f"encoding must be a string, got {manifest['encoding']!r}"
    n_vocab, eot = manifest["n_vocab"], manifest["eot"]
    if not _is_count(n_vocab) or n_vocab < 1:
        return f"n_vocab must be an integer >= 1, got {n_vocab!r}"
    if not _is_count(eot) or eot >= n_vocab:
        return f"eot {eot!r} is not below n_vocab {n_vocab}"
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        return f"splits must be an object, got {splits!r}"
    for name in SPLITS:
        split = splits.get(name)
        if split is None:
            return f"no split {name!r} (prepare always writes {' and '.join(SPLITS)})"
        for key in ("documents", "tokens", "shards"):
            if not isinstance(split, dict) or key not in split:
                return f"split {name!r}: missing {key!r}"
        if not (_is_count(split["documents"]) and _is_count(split["tokens"])):
            return f"split {name!r}: documents and tokens must be integers >= 0"
        if not isinstance(split["shards"], list):
            return f"split {name!r}: shards must be a list"
        for entry in split["shards"]:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("file"), str)
                and _is_count(entry.get("tokens"))
                and isinstance(entry.get("crc32"), str)
                and CRC_HEX.fullmatch(entry["crc32"])
            ):
                return f"split {name!r}: bad shard entry {entry!r} (want file, tokens, crc32)"
            if entry["file"] in ("", ".", "..") or Path(entry["file"]).name != entry["file"]:
                return f"split {name!r}: shard {entry['file']!r} is not a file name in DIR"
        total = sum(entry["tokens"] for entry in split["shards"])
        if total != split["tokens"]:
            return f"split {name!r} has tokens {split['tokens']}, but its shards sum to {total}"
    return None


def read_manifest(data_dir: Path) -> dict:
    """Read and check DIR/manifest.json; ValueError naming the file for anything wrong.

    A manifest that passes has `encoding` (str), `n_vocab`, `eot` (eot < n_vocab) and
    `splits["train"]` and `splits["val"]`, each with integer `documents` and `tokens` (the sum
    of its shards' tokens; 0 for an empty split, e.g. prepared with --val-fraction 0) and the
    list `shards` of {"file", "tokens", "crc32"}.
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():  # a corpus file, named where its data set goes
        raise ValueError(
            f"data directory {data_dir} is a file, not a folder written by prepare; prepare "
            f"it with `python -m gpt.data.prepare {data_dir} --out DIR` and name DIR here"
        )
    if not data_dir.is_dir():
        raise ValueError(
            f"data directory {data_dir} does not exist; create it with "
            f"`python -m gpt.data.prepare SOURCE... --out {data_dir}`"
        )
    path = data_dir / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {data_dir} is not a data set written by prepare; create it with "
            f"`python -m gpt.data.prepare SOURCE... --out {data_dir}`"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {remedy(data_dir)}") from e
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; {remedy(data_dir, manifest)}")
    return manifest


def iter_split(
    data_dir: Path, split: str, verify: str = "full"
) -> Iterator[tuple[Path, np.ndarray]]:
    """Validate each shard of `split` against its header and the manifest and yield (path,
    its memory map), one at a time: a caller that keeps only what it needs holds one open
    file, however many shards the split has (each map holds a file descriptor)."""
    manifest = read_manifest(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{Path(data_dir) / MANIFEST}: no split {split!r}; has {sorted(splits)}")
    fix = remedy(data_dir, manifest)
    for entry in splits[split]["shards"]:
        path = Path(data_dir) / entry["file"]
        header = read_header(path, fix)
        found = (header.encoding, header.n_vocab, header.count, f"{header.crc32:08x}")
        wanted = (manifest["encoding"], manifest["n_vocab"], entry["tokens"], entry["crc32"])
        if found != wanted:
            raise ValueError(
                f"shard {path}: header (encoding, vocabulary, tokens, crc32) = {found}, "
                f"manifest says {wanted}: replaced after the manifest was written; {fix}"
            )
        yield path, open_shard(path, verify, fix)


def open_split(data_dir: Path, split: str, verify: str = "full") -> list[np.ndarray]:
    """Validate every shard of `split` against its header and the manifest; memory-map them
    all (one open file each: for many shards, use `iter_split`)."""
    return [tokens for _, tokens in iter_split(data_dir, split, verify)]
