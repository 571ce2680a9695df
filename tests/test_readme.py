"""README.md's walk-through runs as written, scaled down: the first command blocks of its Train,
Sample and Export sections (prepare, train, report, sample, export), in a fresh directory,
with the training run cut to two steps. tests/test_docs.py checks every other command against
the code."""

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


def test_the_readme_walkthrough_runs(tmp_path):
    if (
        not (cache_dir() / "corpora" / "shakespeare" / "VERIFIED").exists()
        or not ranks_path("gpt2").exists()
    ):
        pytest.skip("needs `make assets` (Shakespeare and the GPT-2 ranks in the cache)")
    for name in ("configs", "train.py", "sample.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    sample = [c for c in first_block("Sample and evaluate") if "sample.py" in c][:1]
    steps = [*first_block("Train"), *sample, *first_block("Export")]
    assert any("train.py" in c for c in steps) and sample, steps
    env = subprocess_env()  # not this process's own process-group variables (its port)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in steps:
        if re.search(r"\btrain\.py\b", command):
            command += SHORT
        done = subprocess.run(
            ["bash", "-e", "-c", command], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert (tmp_path / "out" / "tiny" / "loss.png").exists()
    assert (tmp_path / "out" / "tiny-hf" / "config.json").exists()
