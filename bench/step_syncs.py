"""Host synchronisations per optimizer step of the trainer, counted rather than timed.

    python bench/step_syncs.py CONFIG.toml [--steps 5 10] [--section.key=value ...]

Runs ``train.py CONFIG`` in this process twice (``--steps`` A and B optimizer steps, logged,
evaluated and checkpointed only at the end) and counts every host read of a tensor: each
``.item()``, ``bool(t)``, ``float(t)`` reaches the dispatcher as ``aten._local_scalar_dense``
(a ``TorchDispatchMode`` counts them) and each ``.tolist()`` is counted one level up (a
``TorchFunctionMode``). On a GPU each one waits for the queue to drain. (B - A) / (B - A
steps) is the cost of an ordinary step; the sites of the reads are listed, most frequent
first.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.cli import train  # noqa: E402


def site() -> str:
    """The innermost frames outside torch: where the read was asked for."""
    frames = [
        f
        for f in traceback.extract_stack()
        if "/torch/" not in f.filename and f.filename != __file__
    ]
    return " <- ".join(
        f"{f.filename.split('site-packages/')[-1].split(str(ROOT) + '/')[-1]}:{f.lineno}"
        for f in reversed(frames[-3:])
    )


class Reads(TorchDispatchMode):
    def __init__(self, sites: collections.Counter):
        super().__init__()
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.sites[site()] += 1
        return func(*args, **(kwargs or {}))


class ToLists(TorchFunctionMode):
    def __init__(self, sites: collections.Counter):
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.sites["tolist: " + site()] += 1
        return func(*args, **(kwargs or {}))


def count(config: str, steps: int, overrides: list[str]) -> collections.Counter:
    sites: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as out:
        argv = [
            config,
            f"--train.max_steps={steps}",
            f"--train.out_dir={out}",
            "--train.log_interval=1000000",
            "--train.eval_interval=0",
            "--train.ckpt_interval=1000000",
            "--train.wandb=false",
            *overrides,
        ]
        with ToLists(sites), Reads(sites), contextlib.redirect_stdout(io.StringIO()):
            if train.main(argv) != 0:
                raise SystemExit(f"train.py {' '.join(argv)} failed")
    return sites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, nargs=2, default=[5, 10])
    args, overrides = p.parse_known_args()
    import deepspeed  # noqa: F401  (imported under the counters it would take a minute)

    a, b = args.steps
    short, long = count(args.config, a, overrides), count(args.config, b, overrides)
    per_step = (sum(long.values()) - sum(short.values())) / (b - a)
    print(f"{' '.join(overrides) or 'defaults'}: {per_step:g} host reads per optimizer step")
    print(f"  ({a} and {b} steps: {sum(short.values())} and {sum(long.values())} reads in all)")
    for where, n in (long - short).most_common():
        print(f"  {n / (b - a):g} per step at {where}")


if __name__ == "__main__":
    main()
