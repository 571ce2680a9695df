"""Pretrain a GPT: ``python train.py CONFIG.toml [--section.key=value ...]``.

The DeepSpeed training loop lands with issue #4; until then this entry point resolves and
validates the configuration, builds the model, and records the resolved config in the run
directory, so that configs can already be checked with it.
"""

import sys
from pathlib import Path

from gpt import GPT
from gpt.config import config_from_argv, save_config


def main(argv: list[str]) -> None:
    path, cfg = config_from_argv(argv, "train.py")
    model = GPT(cfg.model)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")
    m = cfg.model
    print(
        f"config {path}: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, "
        f"context {m.block_size}, attention {m.attention!r}: {model.num_params():,} parameters"
    )
    print(f"resolved config written to {out_dir / 'config.toml'}")
    print("the DeepSpeed training loop arrives with issue #4 (trainer); nothing was trained")


if __name__ == "__main__":
    main(sys.argv[1:])
