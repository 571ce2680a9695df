"""Decoding speed: KV-cache decoding against full recomputation (nanoGPT's method).

    python bench/decode.py [--configs tiny nanogpt-char] [--prompt-tokens 16] [--rounds 3]

For each model shape (random weights: speed does not depend on their values; float32, batch
1, greedy; ``nanogpt-char`` is nanoGPT's Shakespeare-character "baby GPT": 6 layers, 6 heads,
384 wide, block 256, 65 tokens; ``tiny`` is configs/tiny.toml) it times the new tokens that
fill the context (block_size - prompt tokens, unless --new-tokens) with

- ``recompute``: nanoGPT's ``generate``: the whole context through the model at every step;
- ``kv-cache``: one prefill of the prompt, then the single-token step
  (``gpt.generate.DecodeStep``), eager: the attention backend on the filled keys;
- ``kv-cache compiled``: the static-shape step (masked attention over the whole cache)
  compiled with ``torch.compile`` (its compile time is reported apart; on a GPU with CUDA
  graphs, mode "reduce-overhead").

The LM head sees only the last position in every method (as nanoGPT does at inference), so the
comparison is of the decoding work. Rounds interleave the methods and the best round of each
counts (the machine may be shared). It checks that every method's greedy tokens are identical
to recomputation's and prints tokens per second and the speed-up over recomputation.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt import GPT, ModelConfig, load_config  # noqa: E402
from gpt.generate import decode  # noqa: E402

NANOGPT_CHAR = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)


class LastPosition(torch.nn.Module):
    """The LM head applied to the last position only: (B, T, C) -> (B, 1, vocab)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1:])


def time_decode(model, idx, new_tokens, **kw) -> tuple[float, torch.Tensor]:
    if idx.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = torch.stack(list(decode(model, idx, new_tokens, temperature=0.0, **kw)), dim=1)
    if idx.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def model_config(name: str) -> ModelConfig:
    if name == "nanogpt-char":
        return ModelConfig(**NANOGPT_CHAR)
    return load_config(ROOT / "configs" / f"{name}.toml").model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "nanogpt-char"])
    p.add_argument("--new-tokens", type=int, help="[default: block_size - prompt tokens]")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())  # fmt: skip
    print(f"torch {torch.__version__}, {where}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")  # fmt: skip
    print(f"batch 1, float32, greedy, prompt {args.prompt_tokens} tokens, attention "
          f"{args.attention}, best of {args.rounds} interleaved rounds\n")  # fmt: skip
    header = f"{'config':<13} {'params':>7} {'block':>5} {'new':>4} {'method':<18} {'seconds':>8} "
    print(header + f"{'tokens/s':>9} {'speed-up':>9}")
    for name in args.configs:
        cfg = model_config(name)
        cfg.attention, cfg.dropout = args.attention, 0.0
        new = args.new_tokens or cfg.block_size - args.prompt_tokens
        torch.manual_seed(0)
        model = GPT(cfg).to(device).eval()
        params = model.num_params()
        model.lm_head = LastPosition(model.lm_head)
        idx = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), device=device)
        methods = {"recompute": dict(use_cache=False), "kv-cache": {}}
        if not args.no_compile:
            methods["kv-cache compiled"] = dict(compile=True)
            start = time.perf_counter()
            time_decode(model, idx, 4, compile=True)  # compiles the step
            compile_s = time.perf_counter() - start
        for kw in methods.values():  # warm-up
            time_decode(model, idx, 4, **kw)
        best: dict[str, tuple[float, torch.Tensor]] = {}
        for _ in range(args.rounds):
            for method, kw in methods.items():
                seconds, tokens = time_decode(model, idx, new, **kw)
                if method not in best or seconds < best[method][0]:
                    best[method] = (seconds, tokens)
        base = best["recompute"][0]
        for method, (seconds, _) in best.items():
            print(f"{name:<13} {params / 1e6:>6.1f}M {cfg.block_size:>5} {new:>4} {method:<18} "
                  f"{seconds:>8.3f} {new / seconds:>9.1f} {base / seconds:>8.1f}x")  # fmt: skip
        same = all(torch.equal(best["recompute"][1], t) for _, t in best.values())
        print(f"{'':<13} greedy tokens of every method identical to recompute: {same}")
        if not args.no_compile:
            print(f"{'':<13} compiling the step took {compile_s:.1f} s (once per model and batch)")
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
