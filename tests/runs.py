"""Shared by the trainer tests: a tiny config, running train.py in and out of process, and
reading what a run wrote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from gpt.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[model]
vocab_size = 257
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = {dropout}
[data]
dir = "{data}"
[train]
out_dir = "{out}"
max_steps = 10
micro_batch_size = 4
grad_accum = 2
eval_interval = 5
eval_steps = 2
ckpt_interval = 5
log_interval = 1
seed = 7
wandb = false
sample_tokens = 0
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 3
"""
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def config(tmp_path, data_dir, name="run", dropout=0.0):
    out = tmp_path / name
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(data=data_dir, out=out, dropout=dropout))
    return path, out


def records(out: Path) -> list[dict]:
    """metrics.jsonl as written: a list, so a duplicated or missing step shows."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    """Training loss by step (step 0 of a fine-tuning run has none); asserts that no step was
    logged twice."""
    steps = [r["step"] for r in records(out)]
    assert steps == sorted(set(steps)), f"{out}/metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out) / "model" / "model.safetensors")


def optimizer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    # our own DeepSpeed checkpoint, written by the test's run: trusted, so a full load is fine
    state = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    flat = {}
    for pid, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            flat[f"{pid}.{key}"] = torch.as_tensor(value)
    return flat


def subprocess_env() -> dict[str, str]:
    """The environment without this process's own (in-process) process-group variables."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def run_script(args, env: dict | None = None, **kwargs):
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=subprocess_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def torchrun(path, *overrides, nproc: int = 2):
    args = [
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(ROOT / "train.py"),
        str(path),
        *overrides,
    ]
    proc = run_script(args)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return proc


def copy_run_at(src: Path, dst: Path, step: int) -> None:
    """``dst`` holds the run ``src`` as if it had stopped after the checkpoint of ``step``."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
