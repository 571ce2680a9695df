"""Export a run, a checkpoint or a model directory for other tools.

    python -m gpt.convert SRC OUT_DIR [--architecture transformers|gpt2|llama|gpt|auto]

SRC is a training run (its latest complete checkpoint), one checkpoint or a model directory;
a LoRA run's adapters are merged into its base (a plain model).
The default, ``transformers``, writes GPT-2's or Llama's architecture and refuses (status 2, naming
the switches) a model that neither represents. OUT_DIR must lie outside every run directory,
checkpoint and the source, and be new, empty or an earlier export (gpt/convert/destination.py).
The export records the source's attention backend and carries its tokenizer's Hugging Face
files where that format can represent it (gpt/convert/hf_tokenizer.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gpt.convert import ARCHITECTURE_CHOICES, hf_tokenizer, write_model_dir
from gpt.convert.destination import check_destination


def main(argv: list[str] | None = None) -> int:
    # here, not at the top: the package gpt.convert never imports the model (which imports it)
    from gpt.store import load_model, model_config_of, model_dir_of, tokenizer_of

    p = argparse.ArgumentParser(prog="python -m gpt.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="run directory, checkpoint or model directory")
    p.add_argument("out", help="directory to write config.json + model.safetensors into")
    p.add_argument(
        "--architecture",
        choices=ARCHITECTURE_CHOICES,
        default="transformers",
        help="transformers: GPT-2 or Llama, whichever fits, else an error; gpt: our own "
        "architecture; auto: transformers when it fits, else ours (default: transformers)",
    )
    args = p.parse_args(argv)
    try:
        model_dir = model_dir_of(args.src)  # a LoRA checkpoint's base
        check_destination(args.out, [args.src, model_dir])
        # naive builds anywhere (the source's backend may need a GPU); the export records the
        # source's own backend, which every tool that reads the export back then runs
        model = load_model(args.src, attention="naive")
        cfg = dataclasses.replace(model.cfg, attention=model_config_of(args.src).attention)
        tokenizer = tokenizer_of(args.src)
        state = model.state_dict()
        architecture = write_model_dir(args.out, cfg, state, tokenizer, args.architecture)
    except (
        ValueError,
        FileNotFoundError,
        RuntimeError,
    ) as err:  # RuntimeError: a damaged checkpoint
        print(f"python -m gpt.convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({architecture} architecture) from {args.src}")
    why = "it records no tokenizer" if tokenizer is None else hf_tokenizer.unsupported(tokenizer)
    if why is not None:
        print(
            f"note: no tokenizer files written ({args.src}: {why}); transformers' "
            "AutoTokenizer and pipeline cannot load this export"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
