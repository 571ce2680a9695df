"""Export a run, a checkpoint or a model directory for other tools.

    python -m gpt.convert SRC OUT_DIR [--architecture transformers|gpt2|llama|gpt|auto]

SRC is a training run (its latest complete checkpoint), one checkpoint or a model directory;
a LoRA run's adapters are merged into its base (a plain model).
The default, ``transformers``, writes GPT-2's or Llama's layout and refuses (status 2, naming
the switches) a model that neither represents.
"""

from __future__ import annotations

import argparse
import sys

from gpt.convert import LAYOUTS


def main(argv: list[str] | None = None) -> int:
    # here, not at the top: the package gpt.convert never imports the model (which imports it)
    from gpt.train.checkpoint import load_model, tokenizer_of

    p = argparse.ArgumentParser(prog="python -m gpt.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="run directory, checkpoint or model directory")
    p.add_argument("out", help="directory to write config.json + model.safetensors into")
    p.add_argument(
        "--architecture",
        choices=LAYOUTS,
        default="transformers",
        help="transformers: GPT-2 or Llama, whichever fits, else an error; gpt: our own "
        "layout; auto: transformers when it fits, else ours (default: transformers)",
    )
    args = p.parse_args(argv)
    try:
        # checks every weight's name and shape; a LoRA run's adapters are merged
        model = load_model(args.src, attention="naive")
        layout = model.save_pretrained(args.out, tokenizer_of(args.src), args.architecture)
    except (
        ValueError,
        FileNotFoundError,
        RuntimeError,
    ) as err:  # RuntimeError: a damaged checkpoint
        print(f"python -m gpt.convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({layout} layout) from {args.src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
