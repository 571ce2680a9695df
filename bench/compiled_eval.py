"""Step time of a compiled training run before and after its evaluations.

    python bench/compiled_eval.py CONFIG.toml [--steps 40] [--eval-interval 10]
        [--through-compiled] [--section.key=value ...]

Trains ``CONFIG`` with ``train.compile = true`` for ``--steps`` steps, evaluating (validation
loss and samples) every ``--eval-interval`` steps, logging every step, and reads the step
times back from ``metrics.jsonl``. It reports the median step time of the steps before the
first evaluation and after it (the first ``--skip`` steps, where compilation happens, and
each step right after an evaluation, whose time includes the evaluation, are left out), and
Dynamo's own counters: graphs compiled, and compiled variants of ``GPT.forward``.

``--through-compiled`` evaluates and samples through the compiled module (what the trainer
did before ``gpt.eval.validation.eager``), to show what that costs: under ``no_grad`` and at
the sampling shapes Dynamo compiles more graphs, and with automatic dynamic shapes the
training graph it falls back to may be slower.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.cli import train  # noqa: E402
from gpt.fileio import write_atomic  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.train import trainer  # noqa: E402


@contextlib.contextmanager
def through_compiled(model):
    yield model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--skip", type=int, default=3, help="first steps left out (compilation)")
    p.add_argument("--through-compiled", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args, overrides = p.parse_known_args()  # the rest: --section.key=value, as for train.py
    if args.through_compiled:
        trainer.eager = through_compiled
    run_dir = Path(tempfile.mkdtemp(prefix="compiled-eval-"))
    argv = [
        args.config,
        "--train.compile=true",
        f"--train.max_steps={args.steps}",
        f"--train.eval_interval={args.eval_interval}",
        "--train.log_interval=1",
        f"--train.ckpt_interval={10 * args.steps}",
        "--train.wandb=false",
        f"--train.out_dir={run_dir}",
        *overrides,
    ]
    try:
        assert train.main(argv) == 0, "training failed"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    evals = [r["step"] for r in records if "val_loss" in r]
    after_eval = {s + 1 for s in evals}
    first = evals[0] if evals else args.steps
    timed = [r for r in records if r["step"] > args.skip and r["step"] not in after_eval]
    before = [r["step_ms"] for r in timed if r["step"] <= first]
    after = [r["step_ms"] for r in timed if r["step"] > first]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "evaluation": "through the compiled module" if args.through_compiled else "eager",
        "evaluated_at": evals,
        "step_ms_before_first_eval": statistics.median(before),
        "step_ms_after_first_eval": statistics.median(after) if after else None,
        "steps_timed": [len(before), len(after)],
        "graphs_compiled": counters["stats"]["unique_graphs"],
        "forward_variants": len(_debug_get_cache_entry_list(GPT.forward.__code__)),
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
