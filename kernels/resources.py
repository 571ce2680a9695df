"""Compile-only resource report of the attention kernels for an H100 (sm_90): no GPU needed.

    python -m gpt.kernels.resources                        # pruned candidates, D 64 and 128, bf16
    python -m gpt.kernels.resources --all --head-dims 128 --kernels triton-packed-gqa

Each autotune candidate (those the pruning keeps, or ``--all``) of each kernel is compiled by
Triton's own compiler (TTIR -> PTX -> cubin, with the ptxas bundled in the wheel) for
compute capability 9.0, and the cubin is read: registers per thread and stack bytes (spilled
registers live there) from ``cuobjdump --dump-resource-usage``, shared memory from Triton's
metadata. A candidate over 227 KiB of shared memory cannot launch on an H100; one with a
stack spills to local memory and is slow. This is static evidence that prunes the autotune
tables before any GPU time is spent; only a GPU can say which of the rest is fastest.
Triton's interpreter must be off (the variable TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H100_SHARED_LIMIT = 232448  # bytes of shared memory one program may use (227 KiB)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
TENSOR_ARGS = ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")
BACKENDS = {"triton": "flash_attention", "triton-packed-gqa": "flash_attention_packed_gqa"}
DESCRIPTOR_ROWS = {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N", "Q_DESC": "BLOCK_M",
                   "DO_DESC": "BLOCK_M"}  # fmt: skip


def _kernels(name: str) -> dict:
    """role -> (module, jit function) of one backend's autotuned kernels."""
    import importlib

    module = importlib.import_module(f"gpt.kernels.{BACKENDS[name]}")
    return {role: (module, kernel) for role, kernel in module.JIT_KERNELS.items()}


def compile_kernel(kernel, values: dict, dtype: str, num_warps: int, num_stages: int) -> dict:
    """Compile ``kernel`` for sm_90 with the constexprs ``values``; its resource usage."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    example = torch.empty(2, 4, 64, values["BLOCK_D"], dtype=getattr(torch, DTYPES[dtype]))
    signature, constexprs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in values:
            signature[name], constexprs[(i,)] = "constexpr", values[name]
        elif name in DESCRIPTOR_ROWS and values.get("USE_TMA"):
            from triton.tools.tensor_descriptor import TensorDescriptor

            block = [1, 1, values[DESCRIPTOR_ROWS[name]], values["BLOCK_D"]]
            desc = TensorDescriptor(example, list(example.shape), list(example.stride()), block)
            signature[name] = mangle_type(desc)
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in TENSOR_ARGS or name in DESCRIPTOR_ROWS:
            signature[name] = mangle_type(example)
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
    started = time.perf_counter()
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    seconds = time.perf_counter() - started
    usage = _cubin_usage(compiled.asm["cubin"])
    return {"shared_bytes": compiled.metadata.shared, **usage, "compile_s": round(seconds, 2)}


def _cubin_usage(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def candidates(backend: str, role: str, head_dim: int, dtype: str, everything: bool) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) of the candidates a long causal call would try on
    a GPU (through the kernel's own autotuner and prune function), or all of them."""
    import torch

    from gpt.kernels.attention_op import block_d

    module, kernel = _kernels(backend)[role]
    tuner = module.autotuned(kernel, role)
    configs = tuner.configs
    if not everything:
        args = {"Q": torch.empty(0, dtype=getattr(torch, DTYPES[dtype])),
                "BLOCK_D": block_d(head_dim), "T_BUCKET": 4096, "S_BUCKET": 4096,
                "GROUP": 1}  # fmt: skip
        configs = tuner.early_config_prune(configs, args)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def report(backends, head_dims, dtype: str, everything: bool, causal: bool = True) -> list:
    from gpt.kernels.attention_op import block_d

    rows = []
    for backend in backends:
        for role, (_, kernel) in _kernels(backend).items():
            for head_dim in head_dims:
                for m, n, warps, stages in candidates(backend, role, head_dim, dtype, everything):
                    values = {"IS_CAUSAL": causal, "BLOCK_M": m, "BLOCK_N": n,
                              "BLOCK_D": block_d(head_dim),
                              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
                    if backend != "triton":
                        values |= {"GROUP": 1, "USE_TMA": True, "PERSISTENT": False}
                    row = {"backend": backend, "kernel": role, "dtype": dtype,
                           "head_dim": head_dim, "block_m": m, "block_n": n, "warps": warps,
                           "stages": stages}  # fmt: skip
                    try:
                        row |= compile_kernel(kernel, values, dtype, warps, stages)
                        row["fits"] = row["shared_bytes"] <= H100_SHARED_LIMIT
                    except Exception as err:  # a candidate the compiler refuses
                        row |= {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    tile = f"{row['block_m']:>3}x{row['block_n']:<3} w{row['warps']} s{row['stages']}"
    head = f"{row['backend']:17} {row['kernel']:4} D={row['head_dim']:<3} {tile}"
    if "error" in row:
        return f"{head}  ERROR {row['error']}"
    spill = f"  SPILLS {row['stack_bytes']} B" if row["stack_bytes"] else ""
    over = "" if row["fits"] else "  OVER 227 KiB"
    return (f"{head}  regs {row['registers']:3}  shared {row['shared_bytes'] // 1024:3} KiB"
            f"{spill}{over}")  # fmt: skip


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(prog="python -m gpt.kernels.resources",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--kernels", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--full-mask", action="store_true", help="non-causal (default: causal)")
    p.add_argument("--all", action="store_true", help="every candidate, not only the pruned")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles for the GPU")
    rows = report(args.kernels, args.head_dims, args.dtype, args.all, not args.full_mask)
    if args.out:
        from gpt.fileio import write_atomic

        command = " ".join(["python -m gpt.kernels.resources", *(argv or sys.argv[1:])])
        import torch
        import triton

        versions = {"triton": triton.__version__, "torch": torch.__version__}
        record = {"command": command, "target": "cuda sm_90", "versions": versions, "rows": rows}
        text = json.dumps(record, indent=1)
        write_atomic(args.out, text + "\n")
    return rows


if __name__ == "__main__":
    main()
