"""Compile the Triton attention kernels' autotune candidates in parallel, before timing them.

    python -m gpt.kernels.warmup --shapes 4x16x4096x128 4x32/8x4096x128 --jobs 16

Triton compiles an autotune candidate the first time a key is tuned, one after another: on a
fresh GPU machine that is most of a benchmark's time (issue 17: autotuning 20 candidates x 3
kernels for every new key, each compiled from scratch). This runs each backend's custom ops
once per shape, mask and dtype with the autotuners' launches *recorded* instead of run (the
small delta kernel does run), works out the candidates each launch would try (through the
autotuner's own pruning), and compiles them in worker processes with Triton's ``warmup``,
which compiles for the GPU at hand without launching. The compiled kernels land in Triton's
on-disk cache, where the benchmark's autotuners find them: they still time every candidate
(milliseconds each) but compile none. Launches that would compile to the same code (the same
constexprs, warps, stages and integer specialisation) are compiled once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import re
import sys
import time

import torch

BACKENDS = {  # backend -> its module of gpt.kernels (whose OP is an attention_op.AttentionOp)
    "triton": "flash_attention",
    "triton-packed-gqa": "flash_attention_packed_gqa",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """ "4x32/8x4096x128" -> (batch 4, heads 32, kv heads 8, T 4096, D 128); the attention
    benchmark (bench/attention.py) reads its ``--shapes`` with this too."""
    match = re.fullmatch(r"(\d+)x(\d+)(?:/(\d+))?x(\d+)x(\d+)", text)
    if not match:
        raise ValueError(f"shape {text!r} is not BxHxTxD or BxH/H_kvxTxD (e.g. 4x32/8x4096x128)")
    B, H, H_kv, T, D = (int(g) if g else None for g in match.groups())
    H_kv = H if H_kv is None else H_kv
    if min(B, H, H_kv, T, D) < 1 or H % H_kv:
        raise ValueError(f"shape {text!r}: sizes must be >= 1 and H a multiple of H_kv")
    return B, H, H_kv, T, D


def _arg_spec(value):
    """A picklable stand-in for one kernel argument, keeping what Triton specialises on."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."))
    if isinstance(value, TensorDescriptor):
        dtype = str(value.base.dtype).removeprefix("torch.")
        return ("desc", dtype, tuple(value.shape), tuple(value.strides), tuple(value.block_shape))
    return value


def _specialisation(spec):
    """Integers compile alike when they agree on == 1, divisibility by 16 and 32-bit range."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return ("int", spec == 1, spec % 16 == 0, abs(spec) < 2**31)
    if isinstance(spec, tuple) and spec[0] == "desc":  # its shape and strides, likewise
        return spec[:2] + tuple(tuple(map(_specialisation, dims)) for dims in spec[2:4]) + spec[4:]
    return spec


def plan(backends, shapes, masks, dtypes, device) -> list[tuple]:
    """The distinct compile jobs (module, kernel role, argument specs, keyword args)
    that the ops of ``backends`` would trigger on these (B, H, H_kv, T, D) shapes."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    recorded = []

    def record(tuner, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        recorded.append((tuner, args, kwargs))

    jobs = {}
    original = Autotuner.run
    Autotuner.run = record
    try:
        for backend in backends:
            module_name = BACKENDS[backend]
            module = importlib.import_module(f"gpt.kernels.{module_name}")
            roles = {id(tuner): role for role, tuner in module.TUNED_KERNELS.items()}
            for B, H, H_kv, T, D in shapes:
                for dtype in dtypes:
                    q, do = (torch.randn(B, H, T, D, device=device, dtype=DTYPES[dtype])
                             for _ in range(2))  # fmt: skip
                    k, v = (torch.randn(B, H_kv, T, D, device=device, dtype=DTYPES[dtype])
                            for _ in range(2))  # fmt: skip
                    lse = torch.zeros(B, H, T, device=device)
                    for causal in (m == "causal" for m in masks):
                        recorded.clear()
                        module.OP.forward(q, k, v, causal, D**-0.5)
                        module.OP.backward(do, q, k, v, do, lse, causal, D**-0.5)
                        for tuner, args, kwargs in recorded:
                            _add_jobs(jobs, module_name, roles[id(tuner)], tuner, args, kwargs)
    finally:
        Autotuner.run = original
    return list(jobs.values())


def _add_jobs(jobs: dict, module: str, role: str, tuner, args, kwargs) -> None:
    tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
    for config in tuner.prune_configs(kwargs):
        if config.pre_hook is not None:  # sets the descriptors' blocks for this config
            config.pre_hook({**tuner.nargs, **kwargs, **config.all_kwargs()})
        specs = tuple(_arg_spec(a) for a in args)
        options = {**kwargs, **config.all_kwargs()}
        key = (module, role, tuple(map(_specialisation, specs)), tuple(sorted(options.items())))
        jobs.setdefault(key, (module, role, specs, options))
    tuner.nargs = None


def _compile(job) -> float:
    """Worker: compile one job for this process's GPU; seconds taken."""
    import importlib

    from triton.runtime.jit import MockTensor
    from triton.tools.tensor_descriptor import TensorDescriptor

    module, role, specs, options = job
    fn = importlib.import_module(f"gpt.kernels.{module}").JIT_KERNELS[role]
    args = []
    for spec in specs:
        if isinstance(spec, tuple) and spec[0] == "tensor":
            args.append(getattr(torch, spec[1]))  # warmup takes a dtype for a tensor
        elif isinstance(spec, tuple) and spec[0] == "desc":
            base = MockTensor(getattr(torch, spec[1]))
            args.append(TensorDescriptor(base, list(spec[2]), list(spec[3]), list(spec[4])))
        else:
            args.append(spec)
    started = time.perf_counter()
    fn.warmup(*args, grid=(1,), **options)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt.kernels.warmup",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--shapes", nargs="+", required=True, metavar="BxHxTxD",
                   help="as for bench/attention.py: BxHxTxD or BxH/H_kvxTxD")  # fmt: skip
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    p.add_argument("--masks", nargs="+", choices=["causal", "full"], default=["causal", "full"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    p.add_argument("--jobs", type=int, default=8, help="compiling processes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this compiles for the GPU at hand")
    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError as err:
        p.error(f"--shapes: {err}")
    started = time.perf_counter()
    jobs = plan(args.backends, shapes, args.masks, args.dtypes, torch.device("cuda"))
    print(f"{len(jobs)} distinct compiles, {args.jobs} processes", file=sys.stderr, flush=True)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_compile, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:  # the benchmark will compile (or skip) it
                failed += 1
                module, role, _, options = futures[future]
                print(f"failed: {module} {role} {options}: {future.exception()}", file=sys.stderr)
    wall = time.perf_counter() - started
    print(f"compiled {len(jobs) - failed} of {len(jobs)} in {wall:.0f} s", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
