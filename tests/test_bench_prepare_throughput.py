"""bench/prepare_throughput.py: prepare and the ceiling timed on the same documents, the table
and record it writes, and the byte-for-byte comparison of every run's shards (a difference
fails it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import make_corpus as mc
from bench import prepare_throughput as pt
from gpt.data.assets import cache_dir
from gpt.data.tokenizer import ranks_path

ROOT = Path(__file__).resolve().parents[1]


def test_times_every_format_and_worker_count_and_finds_the_outputs_identical(tmp_path):
    shakespeare = cache_dir() / "corpora" / "shakespeare" / "VERIFIED"
    if not shakespeare.exists() or not ranks_path("gpt2").exists():
        pytest.skip("needs `make assets` (Shakespeare and the GPT-2 ranks in the cache)")
    corpus, out = tmp_path / "corpus", tmp_path / "results"
    mc.make_corpus(corpus, 200_000, ["jsonl", "parquet"], ["shakespeare"])
    argv = [str(corpus), "--out", str(out), "--workers", "1", "2", "--max-rss-mb", "4096"]
    result = subprocess.run(
        [sys.executable, "bench/prepare_throughput.py", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "prepare_throughput.json").read_text())
    assert record["outputs_identical"] and record["problems"] == []
    rows = record["table"]
    assert [(r["format"], r["workers"]) for r in rows] == [
        ("jsonl", 1), ("jsonl", 2), ("parquet", 1), ("parquet", 2)
    ]  # fmt: skip
    assert len({(r["documents"], r["tokens"]) for r in rows}) == 1  # the same text every time
    for r in rows:
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"])
        assert r["wall_s"] > r["main_s"] > 0 and 0 < r["peak_rss_mb"] < 4096
        assert r["cpu_s_per_m_tokens"]["encoder"] > 0
    text = (out / "prepare_throughput.md").read_text()
    assert "bench/prepare_throughput.py" in text and "| parquet | 2 |" in text
    assert "jsonl, 1 -> 2 workers" in result.stdout
    assert not (tmp_path / "corpus-work").exists()  # prepare's output, deleted once hashed

    argv = [str(corpus), "--out", str(out), "--formats", "jsonl", "--workers", "1"]
    result = subprocess.run(
        [sys.executable, "bench/prepare_throughput.py", *argv, "--max-rss-mb", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: jsonl at 1 workers: peak RSS" in result.stderr and "> 1 MB" in result.stderr


def run(fmt, workers, shards, crc="00000000"):
    manifest = {"splits": {"train": {"shards": [{"file": "train_000000.bin", "crc32": crc}]}}}
    return fmt, workers, {"shards": shards, "manifest": manifest}


def test_a_shard_or_manifest_that_differs_is_named():
    same = {"train_000000.bin": "ab"}
    assert pt.differences([run("jsonl", 1, same), run("parquet", 2, same)]) == []
    problems = pt.differences(
        [run("jsonl", 1, same), run("jsonl", 2, {"train_000000.bin": "cd"}, crc="00000001")]
    )
    assert problems == [
        "jsonl at 2 workers: shards differ from jsonl at 1 workers",
        "jsonl at 2 workers: manifest differ from jsonl at 1 workers",
    ]


def test_a_folder_without_a_corpus_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/prepare_throughput.py", str(tmp_path), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "make it with make_corpus" in result.stderr
