"""docs/data.md cannot rot: every sh and python block runs, in order, and prints what the page
says it prints."""

import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from gpt.data.assets import cache_dir
from gpt.data.recipes import RECIPES
from gpt.data.shards import read_manifest
from gpt.data.tokenizer import ranks_path

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), re.S)


def run(lang: str, body: str, cwd: Path) -> subprocess.CompletedProcess:
    # `python` is this interpreter (the project's venv), as with the venv active.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["bash", "-e", "-c", body] if lang == "sh" else [sys.executable, "-c", body]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def uses_recipe(body: str) -> bool:
    return any(re.search(rf"\bprepare {name}\b", body) for name in RECIPES)


def uses_download(body: str) -> bool:
    """A command reading files the user downloads (the GPT-2 scale corpora)."""
    return "downloads/" in body


def test_every_offline_command_runs_and_prints_what_the_page_shows(tmp_path):
    shown = iter(blocks())
    ran = 0
    for lang, body in shown:
        if lang not in ("sh", "python") or uses_recipe(body) or uses_download(body):
            continue
        result = run(lang, body, tmp_path)
        assert result.returncode == 0, (body, result.stderr)
        ran += 1
        if ran == 1:  # the first command's output is shown in the text block after it
            expected_lang, expected = next(shown)
            assert expected_lang == "text" and result.stdout == expected
        if lang == "python":  # each print's output is its line's comment
            comments = re.findall(r"# (.*)$", body, re.M)
            assert result.stdout.splitlines() == comments
        if "--overwrite" in body:  # the guarantees block: two refusals, then a success
            assert result.stdout.count("status 2") == 2
            assert "holds files prepare did not write (notes.txt)" in result.stderr
            assert "blob.txt looks binary" in result.stderr
            assert (tmp_path / "data" / "taken" / "manifest.json").exists()
            assert not (tmp_path / "data" / "taken" / "notes.txt").exists()
        if "--dedup" in body:  # the repeat differing in whitespace only is removed
            assert "dedup: 1 repeated documents removed" in result.stdout
            assert "train: 2 documents" in result.stdout
        if lang == "sh" and "formats/rows.parquet" in body:  # Parquet, .jsonl.zst, folder
            assert result.stdout.count("skipped: 0 empty and 1 null documents") == 2
            assert "skipped: 0 empty and 2 null documents" in result.stdout  # the folder
            assert result.stdout.count("train: 900 documents") == 2
            assert result.stdout.count("val: 100 documents") == 2
            assert "train: 1,801 documents" in result.stdout  # 2,001 documents in all
            assert "status 2" in result.stdout
            assert (
                "formats/rows.parquet: no column 'text'; its columns: id, content; name the one "
                "holding the text with --text-field"
            ) in result.stderr
            data = tmp_path / "data"
            shards = sorted(p.name for p in (data / "parquet").iterdir())
            for name in shards[1:]:  # the manifests differ in their command and sources
                assert (data / "parquet" / name).read_bytes() == (data / "zst" / name).read_bytes()
            assert shards == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    assert ran == 6


def test_recipe_command_gives_the_counts_the_page_states(tmp_path):
    if (
        not (cache_dir() / "corpora" / "shakespeare" / "VERIFIED").exists()
        or not ranks_path("gpt2").exists()
    ):
        pytest.skip("needs `make assets` (Shakespeare and the GPT-2 ranks in the cache)")
    (body,) = [body for lang, body in blocks() if lang == "sh" and uses_recipe(body)]
    result = run("sh", body, tmp_path)
    assert result.returncode == 0, result.stderr
    text = DOC.read_text()
    for split in ("train", "val"):
        line = re.search(rf"^{split}: (\d+) documents, ([\d,]+) tokens", result.stdout, re.M)
        assert f"`{split}: {line[1]} documents, {line[2]} tokens`" in text


# The published layouts the GPT-2 corpora commands read: the folder, two of its file names,
# and the columns with their types (Skylion007/openwebtext's one column; FineWeb-Edu's ten).
FINEWEB_COLUMNS = {
    "text": "string", "id": "string", "dump": "string", "url": "string", "file_path": "string",
    "language": "string", "language_score": "float64", "token_count": "int64",
    "score": "float64", "int_score": "int64",
}  # fmt: skip
STAND_INS = {
    "downloads/openwebtext/data": (
        ["train-00000-of-00080.parquet", "train-00001-of-00080.parquet"],
        {"text": "string"},
    ),
    "downloads/fineweb-edu/sample/10BT": (
        ["000_00000.parquet", "001_00000.parquet"],
        FINEWEB_COLUMNS,
    ),
}
ROWS_PER_FILE = 1000


def write_stand_in(path: Path, columns: dict[str, str], first: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = range(first, first + ROWS_PER_FILE)
    values = {
        "string": lambda name: [f"{name} {i}: the text of web page number {i}." for i in rows],
        "float64": lambda name: [0.5 + i / 1e5 for i in rows],
        "int64": lambda name: list(rows),
    }
    table = pa.table({name: values[kind](name) for name, kind in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=250)


def test_gpt2_corpus_commands_run_on_stand_ins_of_the_published_files(tmp_path):
    if not ranks_path("gpt2").exists():
        pytest.skip("needs the GPT-2 ranks in the cache (`make assets`)")
    for folder, (names, columns) in STAND_INS.items():
        for k, name in enumerate(names):
            write_stand_in(tmp_path / folder / name, columns, k * ROWS_PER_FILE)
    bodies = [body for lang, body in blocks() if lang == "sh" and uses_download(body)]
    assert len(bodies) == len(STAND_INS)
    for body in bodies:
        result = run("sh", body, tmp_path)
        assert result.returncode == 0, (body, result.stderr)
        out = re.search(r"--out (\S+)", body)[1]
        fraction = Fraction(re.search(r"--val-fraction (\S+)", body)[1])
        manifest = read_manifest(tmp_path / out)
        documents = 2 * ROWS_PER_FILE
        val = math.floor(documents * fraction + Fraction(1, 2))  # the split rule, seed 0
        assert manifest["splits"]["val"]["documents"] == val > 0
        assert manifest["splits"]["train"]["documents"] == documents - val
        assert (manifest["encoding"], manifest["text_field"]) == ("gpt2", "text")
    # the configs read what the OpenWebText command writes
    for config in sorted((DOC.parents[1] / "configs").glob("gpt2-*.toml")):
        assert 'dir = "out/data/openwebtext"' in config.read_text(), config


def test_the_openwebtext_split_the_page_states_follows_the_split_rule():
    text = " ".join(DOC.read_text().split())
    total = int(re.search(r"column `text` holds ([\d,]+) documents", text)[1].replace(",", ""))
    train, val = re.search(r"Expect ([\d,]+) train and ([\d,]+) val documents", text).groups()
    fraction = Fraction(re.search(r"--out out/data/openwebtext \\? ?--val-fraction (\S+)", text)[1])
    expected = math.floor(total * fraction + Fraction(1, 2))
    assert (int(train.replace(",", "")), int(val.replace(",", ""))) == (total - expected, expected)
