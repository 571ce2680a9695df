"""Benchmark the sharder against single-process tiktoken on a large corpus of real text.

    python bench/sharding.py --megabytes 200 --workers 2

Builds (once) a JSONL corpus of at least `--megabytes` by repeating the shakespeare, pydocs
and pystdlib documents, then times in separate processes (so their peak memory is separate):
1. `gpt.data.prepare.prepare` on it, end to end and without the interpreter's start-up and
   imports (documents and tokens per second, CPU time, peak RSS);
2. tiktoken's `encode_ordinary_batch` over the same documents held in memory, with one thread
   (the single-process, single-core rate) and with its default 8 threads.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt.data.assets import cache_dir
from gpt.data.recipes import iter_documents

SHARDER = """
import json, sys, time
start = time.perf_counter()
from gpt.data.prepare import prepare
imported = time.perf_counter()
prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False)
print(json.dumps({"imports": imported - start, "prepare": time.perf_counter() - imported}))
"""
BASELINE = """
import json, sys, time
from gpt.data.tokenizer import get_tokenizer
docs = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
enc = get_tokenizer(sys.argv[2]).encoding
start, cpu = time.perf_counter(), time.process_time()
n = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=int(sys.argv[3])))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"tokens": n, "seconds": seconds, "cpu": cpu}))
"""


def build_corpus(path: Path, megabytes: int) -> None:
    if path.exists() and path.stat().st_size >= megabytes * 10**6:
        return
    docs = list(iter_documents(["shakespeare", "pydocs", "pystdlib"]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while f.tell() < megabytes * 10**6:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    tmp.replace(path)


def children_usage() -> tuple[float, float]:
    """(CPU seconds, peak RSS in MB) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/sharding.py", description=__doc__)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoding", default="gpt2")
    args = parser.parse_args()
    corpus = cache_dir() / "bench" / f"corpus_{args.megabytes}mb.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    build_corpus(corpus, args.megabytes)
    size_mb = corpus.stat().st_size / 10**6

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", SHARDER, str(corpus), out, args.encoding, str(args.workers)]
        start = time.perf_counter()
        timing = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        seconds = time.perf_counter() - start
        cpu, rss = children_usage()
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    splits = manifest["splits"].values()
    tokens = sum(s["tokens"] for s in splits)
    docs = sum(s["documents"] for s in splits)
    n_eot = docs  # the sharder also writes one end-of-text token per document
    print(f"corpus: {corpus} ({size_mb:,.0f} MB, {docs:,} documents)")
    print(
        f"sharder, {args.workers} workers: {seconds:.1f} s end to end "
        f"({timing['imports']:.1f} s of it interpreter start-up and imports), "
        f"{(tokens - n_eot) / seconds:,.0f} tokens/s end to end, "
        f"{(tokens - n_eot) / timing['prepare']:,.0f} tokens/s in prepare(), "
        f"{docs / timing['prepare']:,.0f} docs/s, peak RSS {rss:,.0f} MB, "
        f"{cpu / (tokens - n_eot) * 1e6:.3f} CPU-s per M tokens"
    )
    rates = {}
    for threads in (1, 8):
        cmd = [sys.executable, "-c", BASELINE, str(corpus), args.encoding, str(threads)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        rates[threads] = result["tokens"] / result["seconds"]
        assert result["tokens"] == tokens - n_eot, "baseline must see the same documents"
        print(
            f"tiktoken encode_ordinary_batch, num_threads={threads}: "
            f"{rates[threads]:,.0f} tokens/s, {result['cpu'] / result['tokens'] * 1e6:.3f} "
            "CPU-s per M tokens (encoding only, text already in memory)"
        )
    print(
        f"sharder over one thread: {(tokens - n_eot) / seconds / rates[1]:.2f}x end to end, "
        f"{(tokens - n_eot) / timing['prepare'] / rates[1]:.2f}x in prepare() "
        "(wall-clock rates depend on how many cores are free)"
    )


if __name__ == "__main__":
    main()
