"""README.md's walk-through runs as written, scaled down: the first command blocks of its Train,
Sample and Export sections (prepare, train, report, sample, export), in a fresh directory,
with the training run cut to two steps; and every documented command block that uses
`transformers` runs as written from a directory that imports as the repository root does.
tests/test_docs.py checks every other command against the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import subprocess_env
from test_docs import FENCE, split_lines

from gpt.data.assets import cache_dir
from gpt.data.tokenizer import ranks_path

ROOT = Path(__file__).resolve().parents[1]
SHORT = (  # appended to the training command: two steps, an evaluation and a checkpoint
    " --train.max_steps=2 --train.eval_interval=2 --train.eval_steps=1 --train.ckpt_interval=2"
    " --train.log_interval=1 --train.wandb=false"
)


def first_block(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return split_lines(FENCE.search(body)[1])


def needs_assets() -> None:
    if (
        not (cache_dir() / "corpora" / "shakespeare" / "VERIFIED").exists()
        or not ranks_path("gpt2").exists()
    ):
        pytest.skip("needs `make assets` (Shakespeare and the GPT-2 ranks in the cache)")


def run_steps(steps: list[str], cwd: Path) -> None:
    env = subprocess_env()  # not this process's own process-group variables (its port)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in steps:
        if re.search(r"\btrain\.py\b", command):
            command += SHORT
        done = subprocess.run(
            ["bash", "-e", "-c", command], cwd=cwd, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])


@pytest.mark.slow
def test_the_readme_walkthrough_runs(tmp_path):
    needs_assets()
    for name in ("configs", "train.py", "sample.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    sample = [c for c in first_block("Sample and evaluate") if "sample.py" in c][:1]
    steps = [*first_block("Train"), *sample, *first_block("Export")]
    assert any("train.py" in c for c in steps) and sample, steps
    run_steps(steps, tmp_path)
    assert (tmp_path / "out" / "tiny" / "loss.png").exists()
    assert (tmp_path / "out" / "tiny-hf" / "config.json").exists()


def transformers_blocks() -> list[tuple[str, list[str]]]:
    """Every sh block of README.md and docs/ whose commands use `transformers`."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for page in pages:
        for block in FENCE.findall(page.read_text()):
            if re.search(r"\b(import|from) transformers\b", block):
                found.append((page.name, split_lines(block)))
    return found


@pytest.mark.slow
def test_documented_transformers_commands_run_from_the_root(tmp_path):
    """As a user runs them: from a directory holding every top-level entry of the repository
    (links), so that `python -c` imports as it does from the root, where our kernels/ once
    hid the `kernels` distribution transformers imports. The training runs cut to 2 steps."""
    needs_assets()
    blocks = transformers_blocks()
    assert [page for page, _ in blocks].count("export.md") >= 2, blocks
    for entry in ROOT.iterdir():
        if entry.name not in ("out", ".git"):
            (tmp_path / entry.name).symlink_to(entry)
    data = "out/data/shakespeare"
    if any(
        data in " ".join(steps) or "configs/tiny.toml" in " ".join(steps) for _, steps in blocks
    ):
        run_steps([f"python -m gpt.data.prepare shakespeare --out {data}"], tmp_path)
    for _, steps in blocks:
        run_steps(steps, tmp_path)
