"""Shared by the trainer tests: a tiny config, running train.py in and out of process, and
reading what a run wrote."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from gpt.store import latest_checkpoint

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_popen(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process, in a session of its own (``kill_tree`` ends it with its children), whose
    stdout and stderr go to ``log`` (``output(proc)`` reads it): pipes of processes that
    wait for each other must not fill up unread."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of ``proc``, its session and every process under it
    (torchrun starts each worker in a session of its own)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def torchrun_nodes(path, *overrides, nnodes: int = 2, nproc: int = 1) -> None:
    """``nnodes`` torchrun invocations, as on ``nnodes`` machines, meeting on the loopback
    interface (the command of docs/cluster.md with HOST = 127.0.0.1)."""
    port = free_port()
    procs = [
        logged_popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={nnodes}",
                f"--node_rank={node}",
                f"--nproc_per_node={nproc}",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                str(ROOT / "train.py"),
                str(path),
                *overrides,
            ],
            Path(path).with_suffix(f".node{node}.log"),
            subprocess_env(),
        )
        for node in range(nnodes)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            kill_tree(proc)
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node}: {output(proc)[-3000:]}"


def wait_for_records(out: Path, n: int, procs: list, timeout: float = 180) -> None:
    """Until ``out/metrics.jsonl`` holds ``n`` records; fails if a process ends first."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert all(p.poll() is None for p in procs), [output(p)[-2000:] for p in procs]
        assert time.time() < deadline, f"{metrics}: fewer than {n} records after {timeout} s"
        time.sleep(0.02)


def copy_run_at(src: Path, dst: Path, step: int) -> None:
    """``dst`` holds the run ``src`` as if it had stopped after the checkpoint of ``step``."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")


def flip_byte(path, offset=-3):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())
