"""Decoding speed: KV-cache decoding against full recomputation (nanoGPT's method).

    python bench/decode.py [--new-tokens 256] [--prompt-tokens 16] [--configs tiny gpt2-124m]

For each model shape (random weights: speed does not depend on their values; float32, batch
1, greedy) it times ``max_new_tokens`` steps of

- ``recompute``: nanoGPT's ``generate``: the whole window (the last ``block_size`` tokens)
  through the model at every step, LM head on the last position only;
- ``kv-cache``: one prefill of the prompt, then one token per step (``gpt.generate.decode``);
  past ``block_size`` the default, exact window rebuilds the cache for every token;
- ``kv-cache keep=B/2``: past ``block_size`` the cache is rebuilt from the last half only
  (only shown when the run goes past ``block_size``).

The LM head sees only the last position in every method (as nanoGPT does at inference), so the
comparison is of the Transformer work. It checks that the cached and recomputed greedy tokens
are identical, and prints tokens per second and the speed-up.
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

from gpt import GPT, load_config  # noqa: E402
from gpt.generate import decode  # noqa: E402


class LastPosition(torch.nn.Module):
    """The LM head applied to the last position only: (B, T, C) -> (B, 1, vocab)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1:])


def time_decode(model, idx, new_tokens, **kw) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    tokens = torch.stack(list(decode(model, idx, new_tokens, temperature=0.0, **kw)), dim=1)
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "gpt2-124m"])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")  # fmt: skip
    print(f"batch 1, float32, greedy, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, attention {args.attention}\n")  # fmt: skip
    header = f"{'config':<10} {'params':>8} {'block':>6} {'method':<18} {'seconds':>8} "
    print(header + f"{'tokens/s':>9} {'speed-up':>9}")
    for name in args.configs:
        cfg = load_config(ROOT / "configs" / f"{name}.toml").model
        cfg.attention, cfg.dropout = args.attention, 0.0
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        params = model.num_params()
        model.lm_head = LastPosition(model.lm_head)
        idx = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
        time_decode(model, idx, 4)  # warm-up
        time_decode(model, idx, 4, use_cache=False)
        methods = {"recompute": dict(use_cache=False), "kv-cache": {}}
        if args.prompt_tokens + args.new_tokens > cfg.block_size:
            methods[f"kv-cache keep={cfg.block_size // 2}"] = dict(window_keep=cfg.block_size // 2)
        results = {m: time_decode(model, idx, args.new_tokens, **kw) for m, kw in methods.items()}
        base = results["recompute"][0]
        for method, (seconds, _) in results.items():
            rate = args.new_tokens / seconds
            print(f"{name:<10} {params / 1e6:>7.1f}M {cfg.block_size:>6} {method:<18} "
                  f"{seconds:>8.2f} {rate:>9.1f} {base / seconds:>8.1f}x")  # fmt: skip
        same = torch.equal(results["recompute"][1], results["kv-cache"][1])
        print(f"{'':<10} greedy tokens of kv-cache and recompute identical: {same}")
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
