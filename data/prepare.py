"""Tokenize corpora into binary shards: `python -m gpt.data.prepare SOURCE... --out DIR`.

Documents stream from the sources in a fixed order and are tokenized in parallel in batches
by worker processes; results are consumed in submission order, so the shards are identical
byte for byte for any number of workers. Processes, not threads: tiktoken releases the GIL
while it encodes, yet two threads encoding at once were slower than one (JSONL, 200 MB:
4.4 M against 5.0 M tokens/s, twice the CPU time per token), while two processes give
8.1 M against one's 4.7 M (docs/data.md, Throughput, has the commands). A batch (about
1 MiB of text) goes to a worker and its tokens come back; at most two batches per worker
are in flight: memory stays bounded whatever the corpus size (only one whole document must
fit in RAM).

Each document is followed by the end-of-text token. Whether a document goes to `val` depends
only on its index, the fraction and the seed: exactly round(f*n) of the first n documents
(halves up), evenly spread (see `is_val`).

With `--dedup`, a document whose normalised text (Unicode NFC, every run of whitespace one
space, none at either end) was seen before in the stream is dropped, before indexing: the
first occurrence in source order is kept, so the output is the same for any number of
workers, and the manifest's `dedup` says how many were removed. Each document seen costs a
64-bit hash in memory (about 60 bytes in a Python set: 1 GB per 17 million unique documents).

Sources are recipes or local files: text, JSONL and Parquet, gzip or zstd compressed
(`gpt.data.formats`, each read as a stream). Empty documents and null texts are skipped; the
manifest's `skipped` counts them.

A failed or killed run never touches DIR: every input is checked first (missing paths, binary
or non-UTF-8 files, damaged compressed or Parquet files, a missing Parquet column, an empty
corpus), the data set is built beside DIR and swapped in only when complete
(`gpt.data.staging`), and a DIR holding files prepare did not write is refused unless
`--overwrite`. The worker processes end with the run: they leave Ctrl-C to the main process
(one line, status 130, no traceback from each) and exit when it is killed.
"""

import argparse
import contextlib
import hashlib
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from pathlib import Path

from gpt.interrupt import exit_on_interrupt, interrupt_as_usual

if __name__ == "__main__":  # Ctrl-C while the imports load: status 130, not a traceback
    exit_on_interrupt()
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gpt.data.formats import check_file  # noqa: E402
from gpt.data.recipes import RECIPES, fetch_recipe, iter_documents, resolve_source  # noqa: E402
from gpt.data.shards import (  # noqa: E402
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardWriter,
    token_dtype,
    write_manifest,
)
from gpt.data.staging import Staging  # noqa: E402
from gpt.data.tokenizer import FETCHABLE, NAMES, fetch_ranks, get_tokenizer  # noqa: E402

if __name__ == "__main__":
    interrupt_as_usual()

BATCH_CHARS = 1 << 20  # text per task: large enough to amortise scheduling, small for memory
SPLITS = ("train", "val")
PROG = "python -m gpt.data.prepare"
# Below this many tokens per shard prepare warns: every shard is a file, so a billion-token
# corpus at --shard-tokens 1000 is a million files (slow to list, copy and checksum).
SMALL_SHARD_TOKENS = 1_000_000


# What a worker process encodes with: the tokenizer and the split rule (`_start_worker`).
_WORKER: dict = {}


def _start_worker(tokenizer, fraction: Fraction, seed: int, dtype: str) -> None:
    """Set up a worker (or this process, with one worker): ``tokenizer`` is an encoding's
    name in a worker process (each loads its own) or the tokenizer itself."""
    if isinstance(tokenizer, str):
        _leave_interrupts_to_main()
        tokenizer = get_tokenizer(tokenizer)
    _WORKER.update(tokenizer=tokenizer, fraction=fraction, seed=seed, dtype=np.dtype(dtype))


def _leave_interrupts_to_main() -> None:
    """In a worker process: Ctrl-C, which the terminal sends to the whole process group, is
    the main process's to handle (it stops the pool and exits with 130); a worker that raised
    KeyboardInterrupt too would print a traceback. The worker starts with SIGINT blocked
    (`_sigint_blocked`, so not even one arriving while it imports counts); ignored now, the
    unblocking drops a pending one. And a main process killed outright (SIGKILL, SIGTERM)
    cannot stop the pool: its workers would wait for work, or to hand back a result, forever;
    each exits when the main process's end of its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process has ended
    os._exit(1)


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT held back in this thread: a worker process started meanwhile inherits the mask
    (see `_leave_interrupts_to_main`); one that arrives meanwhile is raised on leaving."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _encode_batch(first: int, batch: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """Documents first, first + 1, ... encoded, each followed by end-of-text, and split: the
    main process only appends one array per split and batch."""
    tokenizer, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    eot = np.array([tokenizer.eot], dtype=dtype)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for index, doc in enumerate(batch, first):
        split = "val" if is_val(index, _WORKER["fraction"], _WORKER["seed"]) else "train"
        parts[split] += [tokenizer.encode_array(doc), eot]
    return {s: (np.concatenate(p or [eot[:0]], dtype=dtype), len(p) // 2) for s, p in parts.items()}


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


DEDUP_METHOD = "blake2b-64 of NFC text with whitespace runs as one space, stripped"


def normalise(text: str) -> str:
    """What --dedup compares: NFC, every run of whitespace one space, stripped (case kept)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def dedup_documents(docs: Iterable[str], removed: list[int]) -> Iterator[str]:
    """``docs`` without the ones whose normalised text came before (exact document-level
    deduplication, first occurrence kept); ``removed[0]`` counts those dropped."""
    seen: set[int] = set()
    for doc in docs:
        digest = hashlib.blake2b(normalise(doc).encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little")
        if key in seen:
            removed[0] += 1
            continue
        seen.add(key)
        yield doc


def is_val(index: int, fraction: Fraction, seed: int) -> bool:
    """Whether document `index` (from 0, over all sources) belongs to the validation split.

    With R(m) = floor(m*f + 1/2), the first m documents of the pattern hold R(m) val documents
    (f*m rounded half up) and document m is val when R(m+1) > R(m); any n consecutive documents
    hold floor(f*n) or ceil(f*n), evenly spread. The seed shifts the pattern by `seed`
    documents (the count of the first n is then off by at most one). Exact integer arithmetic:
    the count never depends on float rounding, and n need not be known in advance.
    """
    p, q = fraction.numerator, fraction.denominator
    m = index + seed
    return (2 * (m + 1) * p + q) // (2 * q) > (2 * m * p + q) // (2 * q)


def check_sources(sources: list[str], text_field: str = "text") -> list[Path]:
    """Resolve every source and check every file cheaply, before any work; returns the files.

    A missing path, a binary or non-UTF-8 file, a truncated .zst file, a file that is not
    Parquet or lacks the string column `text_field`, or a corpus of empty files is a
    ValueError naming it (`gpt.data.formats.check_file`). What only reading a whole file
    reveals (a bad line deep in a JSONL file) is found while tokenizing, DIR still untouched.
    """
    if not sources:
        raise ValueError("no SOURCE given: name a recipe, a file, a folder or a glob")
    resolved = [resolve_source(s) for s in sources]
    files = [path for r in resolved if not isinstance(r, str) for path in r]
    has_text = [check_file(path, text_field) for path in files]
    recipes = [r for r in resolved if isinstance(r, str)]
    if not recipes and not any(has_text):
        raise ValueError(f"sources {sources} contain no non-empty documents")
    return files


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
    overwrite: bool = False,
    dedup: bool = False,
) -> dict:
    """Tokenize `sources` into shards under `out`; returns the manifest it wrote.

    `out` is replaced only by a complete data set; if it holds files prepare did not write,
    it is refused unless `overwrite` (which replaces it and everything in it).
    `fetch=False` never downloads: missing tokenizer ranks or corpora are then an error.
    `dedup` drops repeated documents (module docstring).
    """
    if encoding not in NAMES:
        raise ValueError(f"unknown --encoding {encoding!r}; valid: {', '.join(NAMES)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:  # 0 too: it is not "all cores" (leave --workers out for that)
        raise ValueError(f"--workers must be >= 1 (or left out: all cores), got {workers}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    files = check_sources(sources, text_field)
    settings = dict(
        encoding=encoding,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        seed=seed,
        text_field=text_field,
        command=command,
        dedup=dedup,
    )
    # Entered first, so that a refused DIR is reported before any download.
    with Staging(Path(out), overwrite=overwrite, inputs=tuple(files)) as stage:
        if fetch and encoding in FETCHABLE:
            fetch_ranks(encoding)  # set-up time: the one place a run may download ranks
        for source in sources:
            if fetch and source in RECIPES:
                fetch_recipe(source)
        tokenizer = get_tokenizer(encoding)
        manifest = _write_dataset(stage.path, sources, tokenizer, workers, progress, **settings)
        stage.commit()
    return manifest


def _write_dataset(
    out: Path,
    sources: list[str],
    tokenizer,
    workers: int,
    progress: bool,
    *,
    encoding: str,
    val_fraction: float,
    shard_tokens: int,
    seed: int,
    text_field: str,
    command: str | None,
    dedup: bool,
) -> dict:
    writers = {s: ShardWriter(out, s, encoding, tokenizer.n_vocab, shard_tokens) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    # The fraction as written (0.1 is 1/10, not the nearest double), so counts are exact.
    fraction = Fraction(repr(float(val_fraction)))
    dtype = token_dtype(tokenizer.n_vocab).name

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
    removed = [0]  # documents --dedup dropped
    skipped = {"empty": 0, "null": 0}  # documents without text
    docs = iter_documents(sources, text_field, skipped)
    batches = _batches(dedup_documents(docs, removed) if dedup else docs, BATCH_CHARS)
    try:
        if workers == 1:
            _start_worker(tokenizer, fraction, seed, dtype)
            for batch in batches:
                consume(_encode_batch(first, batch))
                first += len(batch)
        else:
            # spawned, not forked: a fork copies whatever locks other threads hold
            context = multiprocessing.get_context("spawn")
            setup = (encoding, fraction, seed, dtype)
            try:
                pool = ProcessPoolExecutor(workers, context, _start_worker, setup)
                try:
                    pending: deque[Future] = deque()
                    for batch in batches:
                        with _sigint_blocked():  # a submit may start a worker process
                            pending.append(pool.submit(_encode_batch, first, batch))
                        first += len(batch)
                        if len(pending) >= 2 * workers:  # backpressure: bounded memory
                            consume(pending.popleft().result())
                    while pending:
                        consume(pending.popleft().result())
                finally:  # after an error or Ctrl-C, the batches not yet started are dropped
                    pool.shutdown(cancel_futures=True)
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a prepare worker process died (--workers {workers}): it was killed (out "
                    "of memory?), or prepare() was called from a script without `if __name__ "
                    "== '__main__':` (each worker is spawned and imports the script first); "
                    "guard the call, or use workers=1"
                ) from None
    finally:
        bar.close()
    if first == 0:
        raise ValueError(f"sources {sources} contain no non-empty documents")

    splits = {s: {**counts[s], "shards": writers[s].close()} for s in SPLITS}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "encoding": encoding,
        "n_vocab": tokenizer.n_vocab,
        "eot": tokenizer.eot,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "sources": [
            {"source": s, "recipe": RECIPES[s].description} if s in RECIPES else {"source": s}
            for s in sources
        ],
        "command": command or "",
        "skipped": skipped,
        "splits": splits,
    }
    if dedup:
        manifest["dedup"] = {"removed_documents": removed[0], "method": DEDUP_METHOD}
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Exit status 0 on success, 2 for bad input or options, 1 when the environment fails
    (a download, a full disk), 130 on Ctrl-C; DIR is unchanged unless the status is 0."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize corpora into binary token shards plus DIR/manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=f"a recipe ({', '.join(sorted(RECIPES))}), a text, JSONL or Parquet file (text "
        "and JSONL also .gz or .zst), a folder or a glob",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--encoding", default="gpt2", help=f"one of {', '.join(NAMES)}")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of documents for val: exactly round(F*n) of n (0: no val split)",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, metavar="N", help="tokens per shard"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer processes (default: all cores)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="shifts which documents are val by S"
    )
    parser.add_argument(
        "--text-field", default="text", help="JSONL key or Parquet column holding the text"
    )
    parser.add_argument(
        "--dedup",
        action="store_true",
        help="drop documents whose whitespace-normalised text came before (exact dedup)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR even if it holds files prepare did not write (they are deleted)",
    )
    args = parser.parse_args(argv)
    if 1 <= args.shard_tokens < SMALL_SHARD_TOKENS:
        print(
            f"{PROG}: warning: --shard-tokens {args.shard_tokens:,} is small: each shard is a "
            f"file, so every 1,000,000 tokens make {-(-1_000_000 // args.shard_tokens):,} "
            f"files; use at least {SMALL_SHARD_TOKENS:,} (default 100,000,000) unless the "
            "corpus is tiny",
            file=sys.stderr,
        )
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([*PROG.split(), *given])
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
            overwrite=args.overwrite,
            dedup=args.dedup,
        )
    except ValueError as e:
        parser.error(str(e))
    except (RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e} ({args.out} is unchanged)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted ({args.out} is unchanged)", file=sys.stderr)
        sys.exit(130)
    for split in SPLITS:
        s = manifest["splits"][split]
        print(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
            f"{len(s['shards'])} shards"
        )
    if sum(manifest["skipped"].values()):
        empty, null = manifest["skipped"]["empty"], manifest["skipped"]["null"]
        print(f"skipped: {empty:,} empty and {null:,} null documents")
    if "dedup" in manifest:
        print(f"dedup: {manifest['dedup']['removed_documents']:,} repeated documents removed")
    if not manifest["splits"]["val"]["tokens"]:
        print("val is empty: train on this data set with train.eval_interval = 0")
    print(f"wrote {args.out / MANIFEST}")


if __name__ == "__main__":
    main()
