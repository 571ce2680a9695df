"""bench/make_corpus.py: the same documents in every format (prepare gives the same shards from
each), none repeated as --dedup sees them, files and row groups of the sizes asked for, the
same bytes for the same seed; a used folder and a bad size refused."""

import argparse
import json

import pyarrow.parquet as pq
import pytest

from bench import make_corpus as mc
from gpt.data.assets import cache_dir
from gpt.data.prepare import prepare

needs_shakespeare = pytest.mark.skipif(
    not (cache_dir() / "corpora" / "shakespeare" / "VERIFIED").exists(),
    reason="needs `make assets` (Shakespeare in the cache)",
)


@needs_shakespeare
def test_every_format_holds_the_same_documents(tmp_path):
    out = tmp_path / "corpus"
    summary = mc.make_corpus(
        out, 300_000, list(mc.FORMATS), ["shakespeare"], row_group_rows=20, file_bytes=100_000
    )
    assert summary["text_bytes"] >= 300_000 and summary["documents"] > 40
    for fmt in ("jsonl", "parquet", "zst"):
        assert len(summary["files"][fmt]) == 3  # rolled over every ~100 kB of text
    groups = [pq.ParquetFile(out / f["file"]).metadata for f in summary["files"]["parquet"]]
    assert all(m.row_group(i).num_rows <= 20 for m in groups for i in range(m.num_row_groups))
    assert sum(m.num_rows for m in groups) == summary["documents"]
    assert pq.ParquetFile(out / summary["files"]["parquet"][0]["file"]).schema_arrow.names == [
        "text", "id", "url", "language_score"
    ]  # fmt: skip
    lines = (out / "jsonl" / "corpus-00000.jsonl").read_text().splitlines()
    sizes = [len(json.loads(line)["text"]) for line in lines]
    assert min(sizes) < 3000 < max(sizes)  # log-normal lengths, not one size

    shards = {}
    for fmt in mc.FORMATS:
        manifest = prepare(
            [str(out / fmt)], tmp_path / fmt, "bytes", workers=2, progress=False, dedup=True
        )
        assert manifest["dedup"]["removed_documents"] == 0
        splits = manifest["splits"]
        assert splits["train"]["documents"] + splits["val"]["documents"] == summary["documents"]
        shards[fmt] = {p.name: p.read_bytes() for p in (tmp_path / fmt).glob("*.bin")}
    assert all(shards[fmt] == shards["jsonl"] for fmt in mc.FORMATS)


@needs_shakespeare
def test_the_seed_fixes_the_bytes(tmp_path):
    def jsonl(seed, name):
        mc.make_corpus(tmp_path / name, 50_000, ["jsonl"], ["shakespeare"], seed=seed)
        return (tmp_path / name / "jsonl" / "corpus-00000.jsonl").read_bytes()

    assert jsonl(0, "a") == jsonl(0, "b") != jsonl(1, "c")


def test_a_used_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "mine.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="jsonl is not empty"):
        mc.make_corpus(tmp_path, 1000, ["jsonl"], ["no-such-recipe"])


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("100mb", 10**8), ("1.5 KB", 1500)])
def test_sizes_are_decimal(text, size):
    assert mc.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "2 GiB", "-1MB", "big"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        mc.parse_size(text)
