"""Tokenize corpora into binary shards: `python -m data.prepare SOURCE... --out DIR`.

Documents stream from the sources in a fixed order and are tokenized in parallel in batches;
results are consumed in submission order, so the shards are identical byte for byte for any
number of workers. tiktoken releases the GIL while encoding, so a thread pool uses every core
without copying text between processes. At most a few batches are in flight at once: memory
stays bounded whatever the corpus size (only one whole document must fit in RAM).

Each document is followed by the end-of-text token. Whether a document goes to `val` depends
only on its index and the seed (an evenly spread, seed-shifted `val_fraction` of documents).
"""

import argparse
import math
import os
import random
import shlex
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt.data.recipes import RECIPES, fetch_recipe, iter_documents, resolve_source
from gpt.data.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardWriter,
    token_dtype,
    write_manifest,
)
from gpt.data.tokenizer import FETCHABLE, NAMES, fetch_ranks, get_tokenizer

BATCH_CHARS = 1 << 20  # text per task: large enough to amortise scheduling, small for memory
SPLITS = ("train", "val")


def _batches(docs, batch_chars: int):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _is_val(index: int, val_fraction: float, shift: float) -> bool:
    # Document i is val when the line y = f*i + shift crosses an integer between i and i+1:
    # exactly round(f*n) of any n consecutive documents, spread evenly, shifted by the seed.
    return math.floor((index + 1) * val_fraction + shift) > math.floor(index * val_fraction + shift)


def prepare(
    sources: list[str],
    out: Path,
    encoding: str = "gpt2",
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    command: str | None = None,
    progress: bool = True,
    fetch: bool = True,
) -> dict:
    """Tokenize `sources` into shards under `out`; returns the manifest it wrote.

    `fetch=False` never downloads: missing tokenizer ranks or corpora are then an error.
    """
    if not sources:
        raise ValueError("no SOURCE given: name a recipe, a file, a folder or a glob")
    if encoding not in NAMES:
        raise ValueError(f"unknown --encoding {encoding!r}; valid: {', '.join(NAMES)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if fetch and encoding in FETCHABLE:
        fetch_ranks(encoding)  # set-up time: the one place a run may download ranks
    for source in sources:
        if fetch and isinstance(resolve_source(source), str):
            fetch_recipe(source)
    tokenizer = get_tokenizer(encoding)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first: until the new one is written, DIR is visibly incomplete.
    (out / MANIFEST).unlink(missing_ok=True)
    writers = {s: ShardWriter(out, s, encoding, tokenizer.n_vocab, shard_tokens) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    shift = random.Random(seed).random()
    dtype = token_dtype(tokenizer.n_vocab)
    eot = np.array([tokenizer.eot], dtype=dtype)

    def encode_batch(first: int, batch: list[str]) -> dict[str, tuple[np.ndarray, int]]:
        # Runs in a worker thread. Documents first, first + 1, ... are split here, so the main
        # thread only appends one array per split and batch.
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for index, doc in enumerate(batch, first):
            split = "val" if _is_val(index, val_fraction, shift) else "train"
            parts[split] += [tokenizer.encode_array(doc), eot]
        # The shard's dtype is chosen here, off the main thread.
        return {
            s: (np.concatenate(p or [eot[:0]], dtype=dtype), len(p) // 2) for s, p in parts.items()
        }

    bar = tqdm(desc="prepare", unit=" doc", disable=not progress, smoothing=0.1)
    start = time.perf_counter()

    def consume(encoded: dict[str, tuple[np.ndarray, int]]) -> None:
        for split, (tokens, documents) in encoded.items():
            writers[split].write(tokens)
            counts[split]["documents"] += documents
            counts[split]["tokens"] += len(tokens)
        total = counts["train"]["tokens"] + counts["val"]["tokens"]
        bar.update(sum(documents for _, documents in encoded.values()))
        bar.set_postfix_str(f"{total / (time.perf_counter() - start):,.0f} tok/s")

    first = 0  # index of the next batch's first document over all sources
    batches = _batches(iter_documents(sources, text_field), BATCH_CHARS)
    if workers == 1:
        for batch in batches:
            consume(encode_batch(first, batch))
            first += len(batch)
    else:
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[Future] = deque()
            for batch in batches:
                pending.append(pool.submit(encode_batch, first, batch))
                first += len(batch)
                if len(pending) >= 2 * workers:  # backpressure: bounded memory
                    consume(pending.popleft().result())
            while pending:
                consume(pending.popleft().result())
    bar.close()
    if first == 0:
        raise ValueError(f"sources {sources} contain no non-empty documents")

    splits = {s: {**counts[s], "shards": writers[s].close()} for s in SPLITS}
    _remove_stale_shards(out, {e["file"] for s in SPLITS for e in splits[s]["shards"]})
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "encoding": encoding,
        "n_vocab": tokenizer.n_vocab,
        "eot": tokenizer.eot,
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "sources": [
            {"source": s, "recipe": RECIPES[s].description} if s in RECIPES else {"source": s}
            for s in sources
        ],
        "command": command or "",
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    # Shards of an earlier, larger run in the same DIR would otherwise linger unlisted.
    for split in SPLITS:
        for path in out.glob(f"{split}_*.bin*"):
            if path.name not in keep:
                path.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize corpora into binary token shards plus DIR/manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=f"a recipe ({', '.join(sorted(RECIPES))}), a text/JSONL file, a folder or a glob",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--encoding", default="gpt2", help=f"one of {', '.join(NAMES)}")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="fraction of documents for val"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, metavar="N", help="tokens per shard"
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="threads (default: all cores)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="chooses which documents are val"
    )
    parser.add_argument("--text-field", default="text", help="JSONL key holding the text")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "data.prepare", *(argv or sys.argv[1:])])
    try:
        manifest = prepare(
            args.sources,
            args.out,
            encoding=args.encoding,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            seed=args.seed,
            text_field=args.text_field,
            command=command,
        )
    except ValueError as e:
        parser.error(str(e))
    for split in SPLITS:
        s = manifest["splits"][split]
        print(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
            f"{len(s['shards'])} shards"
        )
    print(f"wrote {args.out / MANIFEST}")


if __name__ == "__main__":
    main()
