"""Activation checkpointing's memory and time: DeepSpeed training steps with and without
``train.activation_checkpointing`` at several sequence lengths, against the memory estimate.

    python bench/activation_checkpointing.py [--T 512 1024] [--steps 3] [--out FILE.json]
        [-- --model.n_layer=8 ...]   # config overrides (defaults: DEFAULT_MODEL below)

Each setting runs in a fresh process (``--child``): the same steps on a tiny model first, so
that library code is paged in, then ``--steps`` timed DeepSpeed steps (forward, backward,
optimizer) after one untimed step. Memory is the growth of the process's peak resident memory
over those steps (as tests/test_memory.py measures it over two), with glibc's mmap
threshold held fixed (``MALLOC_MMAP_THRESHOLD_``: freed tensors go back to the system, so
the peak is the tensors') and, beside it, under glibc's default (the threshold rises as large
blocks are freed and the heap keeps their pages: what a CPU run shows by default). Time is
the median step. The estimate is ``gpt.memory.training_memory``, what train.py prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = [
    "--model.n_layer=8",
    "--model.n_embd=128",
    "--model.n_head=4",
    "--model.vocab_size=512",
    "--train.micro_batch_size=4",
]
FIXED_THRESHOLD = "131072"  # glibc's initial mmap threshold, held (its default is dynamic)


def child(overrides: list[str], steps: int) -> dict:
    """One setting, in this process: peak memory growth, median step time, the estimate."""
    import torch

    from gpt.config_io import load_config
    from gpt.memory import training_memory
    from gpt.train.engine import build_engine, init_distributed
    from gpt.train.finetune import build_model

    def run(cfg, n: int) -> list[float]:
        m, b = cfg.model, cfg.train.micro_batch_size
        x = torch.randint(0, m.vocab_size, (b, m.block_size))
        engine, _ = build_engine(build_model(cfg), cfg, 1)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            _, loss = engine(x, x)
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - start)
        return times

    cfg = load_config(None, overrides)
    init_distributed(60)
    tiny = dataclasses.replace(cfg.model, n_layer=1, n_embd=32, vocab_size=64, block_size=16)
    run(dataclasses.replace(cfg, model=tiny), 2)
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    times = run(cfg, steps + 1)[1:]  # the first step also allocates the optimizer's state
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "measured": peak,
        "estimated": training_memory(cfg, 1).total,
        "step_s": statistics.median(times),
    }


def measure(overrides: list[str], steps: int, malloc: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = FIXED_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024], help="block sizes")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.overrides, args.steps)))
        return 0
    base = DEFAULT_MODEL + args.overrides
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"model: {' '.join(base)}")
    header = "  T  checkpointing  estimate MiB  measured MiB  est/meas  glibc-default MiB  step s"
    print(header)
    rows = []
    for T in args.T:
        for recompute in (False, True):
            overrides = [*base, f"--model.block_size={T}"]
            overrides.append(f"--train.activation_checkpointing={str(recompute).lower()}")
            fixed = measure(overrides, args.steps, "fixed")
            default = measure(overrides, args.steps, "default")
            row = {
                "T": T,
                "activation_checkpointing": recompute,
                "estimated_bytes": fixed["estimated"],
                "measured_bytes": fixed["measured"],
                "measured_bytes_glibc_default": default["measured"],
                "step_s": fixed["step_s"],
                "step_s_glibc_default": default["step_s"],
            }
            rows.append(row)
            mib = 1 << 20
            print(
                f"{T:5d}  {'block' if recompute else 'none':>13}  "
                f"{row['estimated_bytes'] / mib:12.1f}  {row['measured_bytes'] / mib:12.1f}  "
                f"{row['estimated_bytes'] / row['measured_bytes']:8.2f}  "
                f"{row['measured_bytes_glibc_default'] / mib:17.1f}  {row['step_s']:6.2f}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"overrides": base, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
