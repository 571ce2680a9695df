"""Eager training speed of ``gpt.model.GPT`` against a plain GPT-2 written for this benchmark.

    python bench/eager_model.py [--config configs/tiny.toml] [--vocab 50304] [--repeats 7]

nanoGPT's ``model.py`` is not obtainable here (no package on PyPI ships it, and third-party
code is never committed), so the side-by-side is against ``PlainGPT`` below: the same
architecture written the straightforward way nanoGPT writes it (one fused qkv projection,
``F.scaled_dot_product_attention(is_causal=True)``, GELU, pre-LayerNorm, tied head, full
logits, ``F.cross_entropy``). It is NOT nanoGPT's code. It uses the tanh GELU of GPT-2 (and
of our model) so that both compute the same function: the script checks that, with our
weights loaded, its loss equals ours.

With ``--real-vocab N`` (GPT-2: 50257) two more rows time our model at the real vocabulary,
unpadded and padded to a multiple of 64 (``vocab_multiple``), to show what padding buys.

Each model is timed on the same batches for one training step without the optimizer
(forward, loss, backward, gradients zeroed), interleaved so that load on a shared machine
hits every model alike; the median over ``--repeats`` rounds of ``--steps`` steps is
reported, with each model's throughput over the plain model's (> 1: faster), in wall time and
in this process's CPU time (``time.process_time``: the work done, less sensitive to other
processes on a shared machine than the wall clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt import GPT, load_config  # noqa: E402
from gpt.fileio import write_atomic  # noqa: E402


class PlainBlock(nn.Module):
    """Pre-LN Transformer block, every step written out (benchmark reference only)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(PlainBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weights come from ``load_from``

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def load_from(self, model: GPT) -> None:
        """Our weights under the plain names (same shapes, same layout)."""
        ours = dict(model.named_parameters())
        rename = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f"}
        sub = {"attn_proj": "attn.c_proj", "mlp_proj": "mlp.c_proj", "c_attn": "attn.c_attn"}
        sub["c_fc"] = "mlp.c_fc"
        with torch.no_grad():
            for name, p in self.named_parameters():
                head, _, rest = name.partition(".")
                if head == "h":
                    i, module, leaf = rest.split(".")
                    src = f"transformer.h.{i}.{sub.get(module, module)}.{leaf}"
                else:
                    src = f"{rename.get(head, head)}.{rest}"
                p.copy_(ours[src])


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x, y)
    loss = out[1] if isinstance(out, tuple) else out
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary of both models")
    p.add_argument("--real-vocab", type=int, default=None, help="also time ours at this one")
    p.add_argument("--batch", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    cfg = load_config(args.config)
    m = dataclasses.replace(cfg.model, vocab_size=args.vocab, vocab_multiple=1, dropout=0.0)
    batch = args.batch or cfg.train.micro_batch_size
    torch.manual_seed(0)
    ours = GPT(m)
    plain = PlainGPT(args.vocab, m.block_size, m.n_layer, m.n_head, m.n_embd)
    plain.load_from(ours)
    x = torch.randint(0, args.vocab, (batch, m.block_size))
    y = torch.randint(0, args.vocab, (batch, m.block_size))
    with torch.no_grad():
        a, b = ours(x, y)[1].item(), plain(x, y).item()
    if not math.isclose(a, b, rel_tol=1e-5):
        raise SystemExit(f"the models differ: loss {a} (ours) vs {b} (plain)")
    models = {"plain": plain, "ours": ours}
    if args.real_vocab:
        for multiple in (1, 64):
            real = dataclasses.replace(m, vocab_size=args.real_vocab, vocab_multiple=multiple)
            models[f"ours-{args.real_vocab}-pad{multiple}"] = GPT(real)
        x, y = x % args.real_vocab, y % args.real_vocab  # valid ids for every model
    for model in models.values():  # warm-up: allocator, thread pools
        step(model, x, y)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved: load hits every model alike
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(model, x, y)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    cpu_ms = {name: 1000 * statistics.median(t) for name, t in cpu.items()}
    ratios = {name: ms["plain"] / ms[name] for name in models}
    cpu_ratios = {name: cpu_ms["plain"] / cpu_ms[name] for name in models}
    print(
        f"{m.n_layer} layers x {m.n_embd} wide, vocab {args.vocab}, batch {batch} x "
        f"{m.block_size}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    print("wall ms/step (median), x plain; CPU ms/step of this process (median), x plain")
    for name in models:
        spread = ", ".join(f"{1000 * t:.0f}" for t in times[name])
        print(
            f"{name:<20} {ms[name]:8.1f} {ratios[name]:6.3f}x {cpu_ms[name]:9.1f} "
            f"{cpu_ratios[name]:6.3f}x  (wall rounds: {spread})"
        )
    if args.out:
        result = {
            "command": " ".join(["python", *sys.argv]),
            "model": dataclasses.asdict(m),
            "batch": batch,
            "threads": torch.get_num_threads(),
            "load_1min": os.getloadavg()[0],
            "ms_per_step": ms,
            "cpu_ms_per_step": cpu_ms,
            "rounds_s": times,
            "cpu_rounds_s": cpu,
            "throughput_vs_plain": ratios,
            "cpu_throughput_vs_plain": cpu_ratios,
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
