"""Tests for gpt.data.prepare and gpt.data.recipes: round trip, parallel == serial, errors."""

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpt.data import prepare as prepare_module
from gpt.data.prepare import is_val, prepare
from gpt.data.recipes import iter_documents
from gpt.data.shards import open_split, read_manifest
from gpt.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_corpus(root: Path, n_docs: int = 40) -> list[str]:
    """Text files, a folder and a JSONL file; returns the documents in their stream order."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "naïve", "☃", "\n", "zebra", "  ", "🦙", "end.", "\t"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n_docs)]
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    (root / "folder" / "sub").mkdir(parents=True)
    for i in range(1, 10):
        (root / "folder" / "sub" / f"{i:02d}.md").write_text(docs[i], encoding="utf-8")
    (root / "folder" / "ignored.bin").write_bytes(b"\xff\xfe")
    with open(root / "rest.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[10:]:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    return docs


def sources(root: Path) -> list[str]:
    return [str(root / "a.txt"), str(root / "folder"), str(root / "*.jsonl")]


def decode_split(out: Path, split: str) -> list[str]:
    enc = get_tokenizer(read_manifest(out)["encoding"])
    tokens = np.concatenate([np.asarray(a) for a in open_split(out, split)] or [[]])
    text = enc.decode(tokens.astype(np.int64).tolist())
    assert text == "" or text.endswith("<|endoftext|>"), "every document ends with EOT"
    return text.split("<|endoftext|>")[:-1]


@pytest.mark.parametrize("encoding", ["bytes", "gpt2"])
def test_round_trip(tmp_path, encoding):
    docs = make_corpus(tmp_path)
    out = tmp_path / "out"
    manifest = prepare(
        sources(tmp_path),
        out,
        encoding,
        0.25,
        shard_tokens=50,
        workers=2,
        text_field="body",
        progress=False,
        fetch=False,
    )
    train, val = decode_split(out, "train"), decode_split(out, "val")
    assert sorted(train + val) == sorted(docs)
    assert len(val) == 10 and manifest["splits"]["val"]["documents"] == 10
    # The documented rule, computed independently: with f = 1/4 and seed 0, document i is val
    # when floor((i+1)/4 + 1/2) > floor(i/4 + 1/2), i.e. i = 1, 5, 9, ...
    assert val == [d for i, d in enumerate(docs) if i % 4 == 1]
    assert train == [d for i, d in enumerate(docs) if i % 4 != 1]
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert manifest["encoding"] == encoding
    assert manifest["n_vocab"] == get_tokenizer(encoding).n_vocab


def test_val_selection_is_exact_and_seeded():
    for fraction in (Fraction(1, 100), Fraction(1, 10), Fraction(33, 100)):
        picks = [is_val(i, fraction, 0) for i in range(1000)]
        assert sum(picks) == 1000 * fraction
    a = [is_val(i, Fraction(1, 10), 0) for i in range(100)]
    b = [is_val(i, Fraction(1, 10), 5) for i in range(100)]
    assert sum(a) == sum(b) == 10 and a != b
    assert [i for i, v in enumerate(a) if v][:3] == [4, 14, 24]  # floor(i/10 + 1/2) steps


def test_parallel_equals_serial(tmp_path, monkeypatch):
    # Tiny batches, so that many are in flight at once and finish out of order.
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 50)
    make_corpus(tmp_path, 60)
    outs = {}
    for workers in (1, 3):
        outs[workers] = tmp_path / f"out{workers}"
        prepare(
            sources(tmp_path),
            outs[workers],
            "bytes",
            0.1,
            shard_tokens=64,
            workers=workers,
            text_field="body",
            command=f"workers={workers}",
            progress=False,
            fetch=False,
        )
    files = sorted(p.name for p in outs[1].iterdir())
    assert files == sorted(p.name for p in outs[3].iterdir()) and len(files) > 10
    for name in files:
        if name != "manifest.json":
            assert (outs[1] / name).read_bytes() == (outs[3] / name).read_bytes(), name
    m1, m3 = (json.loads((o / "manifest.json").read_text()) for o in outs.values())
    assert m1.pop("command") != m3.pop("command") and m1 == m3


def test_jsonl_lone_surrogate_is_replaced(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n')
    prepare([str(tmp_path / "s.jsonl")], tmp_path / "o", "bytes", 0, progress=False, fetch=False)
    assert decode_split(tmp_path / "o", "train") == ["a\ufffdb"]


def test_rerun_removes_stale_shards(tmp_path):
    make_corpus(tmp_path)
    out = tmp_path / "out"
    prepare(
        sources(tmp_path), out, "bytes", 0.1, 20, 1, text_field="body", progress=False, fetch=False
    )
    many = len(list(out.glob("*.bin")))
    prepare(
        sources(tmp_path),
        out,
        "bytes",
        0.1,
        10_000,
        1,
        text_field="body",
        progress=False,
        fetch=False,
    )
    assert many > 2 and sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "train_000000.bin",
        "val_000000.bin",
    ]


def test_interrupted_run_leaves_the_old_dataset(tmp_path, monkeypatch):
    make_corpus(tmp_path)
    out = tmp_path / "out"
    prepare(
        sources(tmp_path), out, "bytes", 0.1, 30, 1, text_field="body", progress=False, fetch=False
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dying_documents(*args, **kwargs):
        yield from list(iter_documents(*args, **kwargs))[:25]
        raise KeyboardInterrupt  # stands in for Ctrl-C mid-run (SIGKILL: test_data_reliability)

    monkeypatch.setattr(prepare_module, "iter_documents", dying_documents)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 50)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            sources(tmp_path),
            out,
            "bytes",
            0.1,
            10,
            1,
            text_field="body",
            progress=False,
            fetch=False,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len(open_split(out, "train")) > 1


def test_empty_input_and_bad_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt'\] contain no non-empty documents"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o", "bytes", progress=False, fetch=False)
    with pytest.raises(ValueError, match="'nope.txt' is neither a recipe .*shakespeare"):
        prepare(["nope.txt"], tmp_path / "o", "bytes", progress=False, fetch=False)
    with pytest.raises(ValueError, match=r"matches no files"):
        prepare([str(tmp_path / "*.none")], tmp_path / "o", "bytes", progress=False, fetch=False)
    with pytest.raises(ValueError, match="unknown --encoding 'gpt5'"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o", "gpt5", progress=False, fetch=False)
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 1\)"):
        prepare(
            [str(tmp_path / "empty.txt")], tmp_path / "o", "bytes", 1.0, progress=False, fetch=False
        )
    with pytest.raises(ValueError, match="--shard-tokens must be >= 1, got 0"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o", "bytes", 0.1, 0, progress=False)
    for workers in (0, -2):  # 0 was taken as "all cores"
        with pytest.raises(ValueError, match=rf"--workers must be >= 1 \(or left out: all cores\), "
                           rf"got {workers}"):  # fmt: skip
            prepare([str(tmp_path / "empty.txt")], tmp_path / "o", "bytes", workers=workers)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "o", "bytes", progress=False, fetch=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        prepare(
            [str(tmp_path / "latin1.txt")], tmp_path / "o", "bytes", progress=False, fetch=False
        )


def test_cli_from_any_directory(tmp_path):
    (tmp_path / "doc.txt").write_text("hello world")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gpt.data.prepare", "doc.txt", "--out", "out"]
    cmd += ["--encoding", "bytes", "--val-fraction", "0", "--workers", "2"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "train: 1 documents, 12 tokens, 1 shards" in result.stdout
    assert "val is empty" in result.stdout
    manifest = read_manifest(out)
    assert manifest["command"] == (
        "python -m gpt.data.prepare doc.txt --out out --encoding bytes --val-fraction 0 --workers 2"
    )
    assert decode_split(out, "train") == ["hello world"] and decode_split(out, "val") == []
    bad = subprocess.run(
        cmd[:3] + ["nope.txt", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "'nope.txt' is neither a recipe" in bad.stderr
    # The old spelling still works from the repository root, where data/ is a folder.
    old = subprocess.run(
        [sys.executable, "-m", "data.prepare", "-h"], cwd=REPO, capture_output=True
    )
    assert old.returncode == 0 and b"usage: python -m gpt.data.prepare" in old.stdout


def test_glob_and_folder_sources_with_symlink_loops_finish(tmp_path):
    """`d/**/*.txt` and the folder `d`, with links back to an ancestor, to the folder itself
    and to a sibling: glob.glob walked these for hours; now each folder is read once."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "other").mkdir()
    (d / "sub" / "a.txt").write_text("alpha")
    (d / "other" / "b.txt").write_text("beta")
    for name, target in (("up", ".."), ("self", "."), ("side", "../other")):
        (d / "sub" / name).symlink_to(target)
    (d / "other" / "back").symlink_to("../sub")
    cmd = [sys.executable, "-m", "gpt.data.prepare", "--encoding", "bytes", "--val-fraction", "0"]
    for source, out in (("d/**/*.txt", "glob"), ("d", "folder")):
        result = subprocess.run([*cmd, source, "--out", out], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "train: 2 documents" in result.stdout
        assert decode_split(tmp_path / out, "train") == ["beta", "alpha"]  # other/, then sub/


def test_dedup_keeps_the_first_of_each_normalised_text_for_any_number_of_workers(
    tmp_path, monkeypatch
):
    """--dedup: repeats (exact, or differing only in whitespace or Unicode composition) are
    dropped before indexing, the first kept; the shards equal preparing the unique documents
    alone, for 1 and 3 workers; the manifest counts what was removed."""
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 50)
    unique = ["alpha beta", "Alpha beta", "café au lait", "gamma\n\ndelta", "x"]
    stream = [
        unique[0], unique[1], "  alpha   beta\t", unique[2], "cafe\u0301 au lait",  # NFD café
        unique[3], "gamma delta", unique[0], unique[4], "x ",
    ]  # fmt: skip
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"text": d}) + "\n" for d in stream), encoding="utf-8")
    alone = tmp_path / "unique.jsonl"
    alone.write_text("".join(json.dumps({"text": d}) + "\n" for d in unique), encoding="utf-8")
    common = dict(encoding="bytes", val_fraction=0.4, shard_tokens=16, progress=False, fetch=False)
    expected = prepare([str(alone)], tmp_path / "expected", workers=1, **common)
    assert "dedup" not in expected
    for workers in (1, 3):
        out = tmp_path / f"dedup{workers}"
        manifest = prepare([str(dup)], out, workers=workers, dedup=True, **common)
        assert manifest["dedup"]["removed_documents"] == 5
        assert manifest["splits"] == expected["splits"]
        for split in ("train", "val"):
            assert decode_split(out, split) == decode_split(tmp_path / "expected", split)
    assert read_manifest(tmp_path / "dedup3")["dedup"]["removed_documents"] == 5


def test_dedup_normalises_whitespace_and_composition_only():
    from gpt.data.prepare import dedup_documents, normalise

    assert normalise(" a \t b\n\nc ") == "a b c"
    assert normalise("e\u0301") == "\u00e9" and normalise("A") != normalise("a")
    removed = [0]
    kept = list(dedup_documents(["a b", "a  b", "A b", "ab", "a b "], removed))
    assert kept == ["a b", "A b", "ab"] and removed == [2]
