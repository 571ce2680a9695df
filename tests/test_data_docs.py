"""docs/data.md cannot rot: every sh and python block runs, in order, and prints what the page
says it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.data.assets import cache_dir
from gpt.data.recipes import RECIPES
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


def test_every_offline_command_runs_and_prints_what_the_page_shows(tmp_path):
    shown = iter(blocks())
    ran = 0
    for lang, body in shown:
        if lang not in ("sh", "python") or uses_recipe(body):
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
