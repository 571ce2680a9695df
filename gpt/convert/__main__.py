"""Export a run, a checkpoint or a model directory for other tools.

    python -m gpt.convert SRC OUT_DIR [--architecture transformers|gpt2|llama|gpt|auto]

SRC is a training run (its latest complete checkpoint), one checkpoint or a model directory.
The default, ``transformers``, writes GPT-2's or Llama's layout and refuses (status 2, naming
the switches) a model that neither represents.
"""

from __future__ import annotations

import argparse
import sys

from gpt.convert import LAYOUTS, tokenizer_name


def main(argv: list[str] | None = None) -> int:
    # here, not at the top: the package gpt.convert never imports the model (which imports it)
    from gpt.model import GPT
    from gpt.train.checkpoint import resolve_model_dir

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
        src = resolve_model_dir(args.src)
        model = GPT.from_pretrained(src, attention="naive")  # checks every weight's name and shape
        layout = model.save_pretrained(args.out, tokenizer_name(src), args.architecture)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m gpt.convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({layout} layout) from {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
