"""prepare's tokens/s against tiktoken's own batch encoder, per file format, with its memory.

    python bench/make_corpus.py --size 100MB --out out/bench-corpus-100mb
    python bench/prepare_throughput.py out/bench-corpus-100mb --out bench/results/prepare-cpu

For each format of the corpus (`bench/make_corpus.py`: the same documents as text files,
JSONL, Parquet and .jsonl.zst) and each --workers count N, one after the other, each in a
fresh process:

1. prepare: `gpt.data.prepare.main([FOLDER, "--out", DIR, "--workers", N])`, the command
   line's own code path. Timed by this script from the process's start to its end (`end to
   end`: what a user waits for, interpreter start-up and imports included) and inside the
   process from after its imports to main's return (`in main`: the tokenizer's load, the input
   checks, reading, tokenizing, writing, fsync and the swap into place). With more than one
   worker, prepare's workers are processes of its own: peak RSS is the main process's own
   peak plus N times the largest worker's (`ru_maxrss` of RUSAGE_SELF and RUSAGE_CHILDREN,
   read after main returns), an upper bound on what the processes held at once; CPU time
   (from `wait4`) counts the workers too.
2. the ceiling: tiktoken's `encode_ordinary_batch(docs, num_threads=N)` on the same documents
   (read by the same reader, untimed), 16 MB of text per call, only the calls timed: encoding
   alone, with no I/O, no parsing and nothing written. That process also times tiktoken's
   encoder called serially on the first 16 MB (`encode_to_numpy`, as prepare calls it): the
   CPU time per token of the encoding itself, which no pipeline can go below.

Tokens are the text's tokens: prepare's count less its one end-of-text per document, which
must equal the ceiling's count (checked). The machine may be shared: --rounds repeats every
measurement, interleaved, and the table shows the fastest round of each (CPU time and peak
RSS of that round). After each prepare its shards are hashed and DIR deleted; every format's,
every worker count's and every round's shards must be identical byte for byte and their
manifests equal but for `command` and `sources` (exit status 1 if not, or if a peak RSS
passes --max-rss-mb). Writes OUT/prepare_throughput.json (every round) and
OUT/prepare_throughput.md (the table and this command) and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("txt", "jsonl", "parquet", "zst")
CEILING_CHUNK = 16 * 10**6  # characters per encode_ordinary_batch call: bounded memory

PREPARE = """
import json, resource, sys, time
start = time.perf_counter()
from gpt.data.prepare import main
imported, cpu = time.perf_counter(), time.process_time()
main(sys.argv[2:])
seconds, cpu = time.perf_counter() - imported, time.process_time() - cpu
rss = {k: resource.getrusage(getattr(resource, f"RUSAGE_{k.upper()}")).ru_maxrss
       for k in ("self", "children")}  # KiB on Linux; children: the largest worker
with open(sys.argv[1], "w") as f:
    json.dump({"imports_s": imported - start, "main_s": seconds, "main_cpu_s": cpu,
               "rss_kib": rss}, f)
"""
CEILING = """
import json, sys, time
from gpt.data.recipes import iter_documents
from gpt.data.tokenizer import get_tokenizer
out, source, encoding, threads, chunk = sys.argv[1:4] + [int(a) for a in sys.argv[4:]]
tokenizer = get_tokenizer(encoding)
tokens = documents = 0
seconds = cpu = 0.0
floor = None
def encode(docs):
    global tokens, documents, seconds, cpu, floor
    if floor is None:
        start = time.process_time()
        n = sum(len(tokenizer.encode_array(doc)) for doc in docs)
        floor = (time.process_time() - start) / n
    start, cpu_start = time.perf_counter(), time.process_time()
    ids = tokenizer.encoding.encode_ordinary_batch(docs, num_threads=threads)
    seconds += time.perf_counter() - start
    cpu += time.process_time() - cpu_start
    tokens += sum(map(len, ids))
    documents += len(docs)
docs, chars = [], 0
for doc in iter_documents([source]):
    docs.append(doc)
    chars += len(doc)
    if chars >= chunk:
        encode(docs)
        docs, chars = [], 0
encode(docs)
with open(out, "w") as f:
    json.dump({"tokens": tokens, "documents": documents, "seconds": seconds, "cpu_s": cpu,
               "encoder_cpu_per_token": floor}, f)
"""


def run_child(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run `cmd`, its output in `log`; (wall seconds, CPU seconds, peak RSS bytes) of it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({proc.returncode}); see {log}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # KiB on Linux


def shard_digests(out: Path) -> tuple[dict[str, str], dict]:
    """sha256 of every file but the manifest, and the manifest without command and sources."""
    digests = {}
    for path in sorted(out.iterdir()):
        if path.name != "manifest.json":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            digests[path.name] = h.hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("command", "sources"):
        manifest.pop(key)
    return digests, manifest


def run_prepare(source: Path, workers: int, encoding: str, work: Path) -> dict:
    out, timing = work / f"{source.name}-w{workers}", work / "timing.json"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(source), "--out", str(out), "--workers", str(workers), "--encoding", encoding]
    cmd = [sys.executable, "-c", PREPARE, str(timing), *argv]
    wall, cpu, _ = run_child(cmd, work / f"{source.name}-w{workers}.log")
    digests, manifest = shard_digests(out)
    shutil.rmtree(out)
    documents = sum(s["documents"] for s in manifest["splits"].values())
    timing = json.loads(timing.read_text())
    rss = timing.pop("rss_kib")
    worker = rss["children"] if workers > 1 else 0  # one worker: main encodes itself
    return {
        "command": shlex.join(["python", "-m", "gpt.data.prepare", *argv]),
        "wall_s": wall,
        "cpu_s": cpu,
        **timing,
        "peak_rss_mb": (rss["self"] + workers * worker) / 2**10,
        "peak_rss_main_mb": rss["self"] / 2**10,
        "peak_rss_worker_mb": worker / 2**10,
        "documents": documents,
        # less the one end-of-text per document
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()) - documents,
        "shards": digests,
        "manifest": manifest,
    }


def run_ceiling(source: Path, workers: int, encoding: str, work: Path) -> dict:
    timing = work / "timing.json"
    cmd = [sys.executable, "-c", CEILING, str(timing), str(source), encoding, str(workers)]
    run_child([*cmd, str(CEILING_CHUNK)], work / f"{source.name}-w{workers}-ceiling.log")
    return json.loads(timing.read_text())


def summarise(fmt: str, workers: int, prepares: list[dict], ceilings: list[dict]) -> dict:
    """The fastest round of each, and the rates and ratios they give."""
    p = min(prepares, key=lambda r: r["wall_s"])
    c = min(ceilings, key=lambda r: r["seconds"])
    tokens = p["tokens"]
    if (c["documents"], c["tokens"]) != (p["documents"], tokens):
        raise RuntimeError(
            f"{fmt}: the ceiling saw {c['documents']:,} documents and {c['tokens']:,} tokens, "
            f"prepare {p['documents']:,} and {tokens:,}"
        )
    ceiling = tokens / c["seconds"]
    return {
        "format": fmt,
        "workers": workers,
        "rounds": len(prepares),
        "documents": p["documents"],
        "tokens": tokens,
        "command": p["command"],
        "wall_s": p["wall_s"],
        "imports_s": p["imports_s"],
        "main_s": p["main_s"],
        "tokens_per_s": tokens / p["wall_s"],
        "tokens_per_s_main": tokens / p["main_s"],
        "ceiling_tokens_per_s": ceiling,
        "ratio": tokens / p["wall_s"] / ceiling,
        "ratio_main": tokens / p["main_s"] / ceiling,
        "cpu_s_per_m_tokens": {
            "prepare": p["cpu_s"] / tokens * 1e6,
            "prepare_main": p["main_cpu_s"] / tokens * 1e6,
            "ceiling": c["cpu_s"] / tokens * 1e6,
            "encoder": c["encoder_cpu_per_token"] * 1e6,
        },
        "peak_rss_mb": p["peak_rss_mb"],
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in prepares),
    }


def differences(prepares: list[tuple[str, int, dict]]) -> list[str]:
    """What differs between the prepare runs' outputs (empty: all identical)."""
    fmt0, w0, first = prepares[0]
    problems = []
    for fmt, workers, run in prepares[1:]:
        for key in ("shards", "manifest"):
            if run[key] != first[key]:
                problems.append(
                    f"{fmt} at {workers} workers: {key} differ from {fmt0} at {w0} workers"
                )
    return problems


def table(rows: list[dict]) -> str:
    lines = [
        "| format | workers | prepare tokens/s, end to end (in main) | ceiling tokens/s | "
        "ratio, end to end (in main) | CPU-s per M tokens: prepare (its workers too) / "
        "ceiling / encoder | peak RSS MB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = r["cpu_s_per_m_tokens"]
        lines.append(
            f"| {r['format']} | {r['workers']} | {r['tokens_per_s']:,.0f} "
            f"({r['tokens_per_s_main']:,.0f}) | {r['ceiling_tokens_per_s']:,.0f} | "
            f"{r['ratio']:.2f} ({r['ratio_main']:.2f}) | {cpu['prepare']:.3f} / "
            f"{cpu['ceiling']:.3f} / {cpu['encoder']:.3f} | {r['peak_rss_mb_max']:,.0f} | "
            f"{r['wall_s']:.1f} |"
        )
    lines.append("")
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = {r["workers"]: r for r in rows if r["format"] == fmt}
        if len(mine) > 1:
            lo, hi = mine[min(mine)], mine[max(mine)]
            lines.append(
                f"{fmt}, {lo['workers']} -> {hi['workers']} workers: prepare "
                f"{hi['tokens_per_s'] / lo['tokens_per_s']:.2f}x, ceiling "
                f"{hi['ceiling_tokens_per_s'] / lo['ceiling_tokens_per_s']:.2f}x"
            )
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/prepare_throughput.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("corpus", type=Path, help="a folder written by bench/make_corpus.py")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=None,
                        help="default: every format the corpus has")  # fmt: skip
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--encoding", default="gpt2")
    parser.add_argument("--rounds", type=int, default=1, help="the fastest round counts")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where prepare writes, then deletes (default: CORPUS-work beside the corpus)",
    )
    parser.add_argument("--max-rss-mb", type=float, default=None, help="fail above this peak")
    args = parser.parse_args()
    formats = args.formats or [f for f in FORMATS if (args.corpus / f).is_dir()]
    if not formats:
        parser.error(f"{args.corpus} holds none of {', '.join(FORMATS)}: make it with make_corpus")
    work = args.work or args.corpus.with_name(args.corpus.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    cells = [(fmt, workers) for fmt in formats for workers in args.workers]
    prepares = {cell: [] for cell in cells}
    ceilings = {cell: [] for cell in cells}
    for round_ in range(args.rounds):
        for fmt, workers in cells:
            source = args.corpus / fmt
            p = run_prepare(source, workers, args.encoding, work)
            c = run_ceiling(source, workers, args.encoding, work)
            prepares[fmt, workers].append(p)
            ceilings[fmt, workers].append(c)
            print(
                f"round {round_ + 1}, {fmt}, {workers} workers: prepare {p['tokens'] / p['wall_s']:,.0f} "  # noqa: E501
                f"tokens/s, ceiling {c['tokens'] / c['seconds']:,.0f}, peak RSS "
                f"{p['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
    if args.work is None:
        shutil.rmtree(work)
    rows = [summarise(fmt, w, prepares[fmt, w], ceilings[fmt, w]) for fmt, w in cells]
    problems = differences([(f, w, r) for (f, w), runs in prepares.items() for r in runs])
    if args.max_rss_mb is not None:
        problems += [
            f"{r['format']} at {r['workers']} workers: peak RSS {r['peak_rss_mb_max']:,.0f} MB "
            f"> {args.max_rss_mb:,.0f} MB"
            for r in rows
            if r["peak_rss_mb_max"] > args.max_rss_mb
        ]
    corpus_json = args.corpus / "corpus.json"
    load_after = os.getloadavg()
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "date": date.today().isoformat(),
        "seconds": time.time() - started,
        "corpus": json.loads(corpus_json.read_text()) if corpus_json.exists() else None,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "outputs_identical": not differences(
            [(f, w, r) for (f, w), runs in prepares.items() for r in runs]
        ),
        "problems": problems,
        "table": rows,
        "prepare_runs": [
            {"format": f, "workers": w, **{k: v for k, v in r.items() if k != "manifest"}}
            for (f, w), runs in prepares.items()
            for r in runs
        ],
        "ceiling_runs": [
            {"format": f, "workers": w, **r} for (f, w), runs in ceilings.items() for r in runs
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(rows)
    verdict = "identical" if record["outputs_identical"] else "NOT identical"
    (args.out / "prepare_throughput.md").write_text(
        f"    {record['command']}\n\n{text}\n\nOutputs of every run: {verdict} (shards byte for "
        f"byte; manifests but for command and sources). Load average (1 min) before / after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs.\n"
    )
    print(text)
    print(f"outputs: {verdict}; wrote {args.out / 'prepare_throughput.json'} and .md")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
