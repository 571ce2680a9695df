"""The LM head's loss, plain against chunked (gpt/loss.py): time and peak memory of one
forward and backward pass at GPT-2's vocabulary.

    python bench/loss.py [--tokens 2048] [--width 768] [--vocab 50257] [--rows 50304]
        [--chunks 0 1024 4096] [--dtype fp32|bf16] [--device cpu|cuda] [--repeats 3]
        [--out FILE.json]

Chunk 0 is the plain path, written as gpt/model.py's: every logit at once, the padding
columns masked, an fp32 cross-entropy. Each setting runs in a fresh process, so that its peak
is its own: on a GPU the allocator's peak (``torch.cuda.max_memory_allocated``) over what
the inputs hold; on the CPU the growth of the process's peak resident memory
(``ru_maxrss``) over what it was once the inputs were made, which counts what the C
allocator kept as well as live tensors. Prints a table, and writes the rows as JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt.loss import chunked_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plain_loss(x, weight, targets, vocab_size):
    logits = x @ weight.T  # (N, V')
    logits[:, vocab_size:] = float("-inf")
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one(args: argparse.Namespace) -> dict:
    """Time one setting (``args.chunk``) in this process; its row."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.width, device=device, dtype=dtype, generator=gen)
    weight = 0.02 * torch.randn(args.rows, args.width, device=device, dtype=dtype, generator=gen)
    weight[args.vocab :] = 0  # padding rows, as the model keeps them
    x.requires_grad_(), weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)

    def step() -> float:
        x.grad = weight.grad = None
        if args.chunk:
            loss = chunked_cross_entropy(x, weight, targets, args.vocab, args.chunk)
        else:
            loss = plain_loss(x, weight, targets, args.vocab)
        loss.backward()
        return loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device)
    times, loss = [], None
    for _ in range(args.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "chunk": args.chunk,
        "loss": loss,
        "ms": 1000 * statistics.median(times[1:]),
        "peak_mib": (peak_bytes(device) - before) / 2**20,
        "logits_mib": args.tokens * args.rows * 4 / 2**20,  # the full fp32 logits, for scale
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--tokens", type=int, default=2048, help="N = B x T tokens")
    p.add_argument("--width", type=int, default=768, help="C, the residual width")
    p.add_argument("--vocab", type=int, default=50257, help="V, the real vocabulary")
    p.add_argument("--rows", type=int, default=50304, help="V', the padded head rows")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 4096],
                   help="tokens per chunk (0: the plain path)")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up")
    p.add_argument("--out", type=Path, help="write the rows here as JSON")
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # one setting, in a child
    args = p.parse_args(argv)
    if args.rows < args.vocab:
        p.error(f"--rows ({args.rows}) must be at least --vocab ({args.vocab})")
    if args.chunk is not None:
        print(json.dumps(one(args)))
        return 0
    rows, load = [], os.getloadavg()[0]
    for chunk in args.chunks:
        child = list(sys.argv[1:] if argv is None else argv)
        cmd = [sys.executable, __file__, *child, "--chunk", str(chunk)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain = next((r for r in rows if r["chunk"] == 0), None)
    print(
        f"loss pass, N = {args.tokens} tokens, C = {args.width}, V = {args.vocab} (V' = "
        f"{args.rows}), {args.dtype} on {args.device}, median of {args.repeats} after a warm-up; "
        f"full fp32 logits: {rows[0]['logits_mib']:.0f} MiB; load average {load:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)"
    )
    print(f"{'path':<16}{'fwd+bwd ms':>12}{'peak MiB':>12}{'loss':>12}{'vs plain':>10}")
    for r in rows:
        name = "plain" if r["chunk"] == 0 else f"chunked {r['chunk']}"
        ratio = f"{plain['ms'] / r['ms']:.2f}x" if plain and r["chunk"] else ""
        print(f"{name:<16}{r['ms']:>12.1f}{r['peak_mib']:>12.0f}{r['loss']:>12.6f}{ratio:>10}")
    if args.out:
        env = {"torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "threads": torch.get_num_threads()}  # fmt: skip
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": settings, "env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
