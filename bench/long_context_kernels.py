"""Our Triton attention kernels at long T against float64, in Triton's interpreter on the CPU.

    python bench/long_context_kernels.py [--length 4096] [--head-dim 16] [--heads 2 1]

Issue 24 asks for one long case on the CPU: causal attention at T = 4,096 with grouped-query
heads, forward and backward, each kernel's O, dQ, dK and dV against the float64 reference
(explicit softmax attention in float64; O(T^2) memory per head, 128 MiB at T = 4,096). It
takes minutes in the interpreter, too long for the test suite, so it is a script whose output
is committed (bench/results/cpu-2026-12-07/long_context_kernels.txt). The same check as
tests/kernel_testing.py's ``check_against_reference``: relative error <= 1e-4 in float32.
On a GPU the benchmark rows at T = 16,384 and 32,768 are bench/attention.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_testing import NAMES, forward_backward, make_inputs, reference  # noqa: E402

from gpt.kernels.flash_attention import flash_attention  # noqa: E402
from gpt.kernels.flash_attention_packed_gqa import flash_attention_packed_gqa  # noqa: E402

BOUND = 1e-4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--heads", type=int, nargs=2, default=[2, 1], metavar=("H", "H_KV"))
    args = p.parse_args(argv)
    T, D, (H, H_kv) = args.length, args.head_dim, args.heads
    q, k, v, do = make_inputs(1, H, H_kv, T, T, D, torch.float32)
    ref = reference(q, k, v, do, True, None)
    print(f"causal attention, B=1 H={H} H_kv={H_kv} T={T} D={D}, float32 against float64")
    print(f"{'kernel':<28}{'seconds':>9}" + "".join(f"{n:>11}" for n in NAMES) + "  verdict")
    failed = 0
    for fn in (flash_attention, flash_attention_packed_gqa):
        start = time.perf_counter()
        ours = forward_backward(fn, q, k, v, do, True, None)
        seconds = time.perf_counter() - start
        rel = [
            (a.double() - r).abs().max().item() / (r.abs().max().item() or 1.0)
            for a, r in zip(ours, ref, strict=True)
        ]
        ok = all(e <= BOUND for e in rel)
        failed += not ok
        errors = "".join(f"{e:>11.2e}" for e in rel)
        print(f"{fn.__name__:<28}{seconds:>9.0f}{errors}  {'ok' if ok else 'FAILED'}", flush=True)
    print(f"(relative error: max |ours - float64| / max |float64|; bound {BOUND:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
