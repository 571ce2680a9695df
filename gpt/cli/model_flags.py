"""The flags that choose a model and where it runs, shared by ``sample.py`` and
``python -m gpt.eval``: ``--ckpt`` (the four kinds of path it takes, said once here and in
docs/sampling.md), ``--tokenizer``, ``--attention`` and ``--device``; loading the model they
name (through gpt/store.py, the one loader); and the conventions both parsers follow (help
defaults, ``\\n`` escapes, how ``--show-prompt`` frames a prompt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib

import torch

from gpt import store
from gpt.attention import get_attention
from gpt.data.tokenizer import get_tokenizer
from gpt.sdpa import not_usable, sdpa_order, sdpa_runs

# What gpt.store.locate resolves; a LoRA run or checkpoint has its adapters merged into the
# base they pin. docs/sampling.md ("What --ckpt takes") says the same.
CKPT_HELP = (
    "the model, one of four kinds of directory: a training run (its latest complete "
    "checkpoint), one checkpoint (RUN/checkpoints/step_NNNNNNNN), a model directory of ours "
    "(an export, or a checkpoint's model/) or a Hugging Face GPT-2 or Llama directory "
    "(config.json + model.safetensors)"
)


class HelpWithDefaults(argparse.HelpFormatter):
    """Show "(default: X)" only for flags whose default is a value (not None / off)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line, as the characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def unescape_text_flags(args: argparse.Namespace) -> argparse.Namespace:
    """--template, --separator and --stop with ``\\n`` and ``\\t`` typed on a command line
    read as the characters; ``args``."""
    for key in ("template", "separator"):
        if getattr(args, key) is not None:
            setattr(args, key, unescape(getattr(args, key)))
    if args.stop is not None:
        args.stop = [unescape(s) for s in args.stop]
    return args


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH", help=CKPT_HELP)
    p.add_argument("--tokenizer", help="encoding [default: recorded with the model, else gpt2]")
    p.add_argument("--attention", help="attention backend [default: the model's, else sdpa]")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs: cpu, cuda, cuda:N [default: cuda when available, else cpu]",
    )


def add_context_flags(p: argparse.ArgumentParser) -> None:
    """--rope-scaling and --block-size: run a rotary model at another context than it was
    trained with, without training (zero-shot context extension, docs/long-context.md)."""
    p.add_argument(
        "--rope-scaling",
        metavar="TABLE",
        help="replace the model's model.rope_scaling, a TOML inline table such as "
        "'{type = \"yarn\", factor = 4, original_max_position_embeddings = 128}' ({} for none)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="replace the model's block_size (rotary models: positions are not weights)",
    )


def context_overrides(args: argparse.Namespace) -> dict:
    """The ModelConfig fields --rope-scaling and --block-size replace (none when the parser
    has no such flags); ValueError naming the flag for a value that is not valid."""
    overrides = {}
    if getattr(args, "rope_scaling", None) is not None:
        try:
            table = tomllib.loads(f"v = {args.rope_scaling}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--rope-scaling {args.rope_scaling!r} is not TOML ({err})") from None
        if not isinstance(table, dict):
            raise ValueError(f"--rope-scaling {args.rope_scaling!r}: a TOML inline table, {{...}}")
        overrides["rope_scaling"] = table
    if getattr(args, "block_size", None) is not None:
        overrides["block_size"] = args.block_size
    if not overrides:
        return overrides
    from gpt.config import ConfigError

    cfg = store.model_config_of(args.ckpt)
    flags = " ".join(f"--{k.replace('_', '-')}" for k in overrides)
    if cfg.position_encoding != "rope":
        raise ValueError(
            f"{flags}: the model in {store.model_dir_of(args.ckpt)} has "
            f"position_encoding {cfg.position_encoding!r}; only a rotary model ('rope') runs "
            "at another context without training"
        )
    try:
        dataclasses.replace(cfg, **overrides).validate()
    except ConfigError as err:
        raise ValueError(f"{flags}: {err}") from None
    return overrides


def check_model_flags(args: argparse.Namespace) -> None:
    """ValueError naming the flag for an unusable --attention or --device (before any load)."""
    if args.attention is not None:
        get_attention(args.attention)  # unknown or unusable: the error lists the valid names
    check_device(args.device)


def check_device(name: str) -> None:
    """ValueError naming --device if it is not a device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name!r} is not a device ({err}); valid: cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; valid: cpu, cuda, cuda:N, mps")


def load_model(args: argparse.Namespace, prog: str):
    """(model on --device in eval mode, tokenizer) for --ckpt; warnings start with ``prog``."""
    # "naive" always builds; a LoRA run's adapters are merged into its base
    model = store.load_model(args.ckpt, attention="naive", **context_overrides(args))
    model_dir = store.model_dir_of(args.ckpt)
    recorded = json.loads((model_dir / "config.json").read_text()).get("gpt_config", {})
    try:
        model.set_attention(args.attention or recorded.get("attention", "sdpa"))
    except ValueError as err:  # e.g. trained with "triton", sampled without a GPU
        print(f"{prog}: warning: {err}; using sdpa", file=sys.stderr)
        model.set_attention("sdpa")
    model.to(args.device).eval()
    if model.cfg.attention == "sdpa":  # the kernels it was trained with may not run here
        head, dtype = model.cfg.n_embd // model.cfg.n_head, next(model.parameters()).dtype
        if not all(sdpa_runs(model.sdpa_order, head, dtype, args.device, m) for m in (0, 1)):
            why = not_usable(model.cfg.sdpa_kernels, model.sdpa_order, head, dtype, args.device)
            print(
                f"{prog}: warning: {model_dir / 'config.json'}: {why}; using the default order",
                file=sys.stderr,
            )
            model.sdpa_order = sdpa_order([], args.device)
    name = args.tokenizer or store.tokenizer_of(args.ckpt) or "gpt2"
    tokenizer = get_tokenizer(name)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {name!r} has {tokenizer.n_vocab} tokens but the model in {model_dir} "
            f"has a vocabulary of {model.cfg.vocab_size}; pass --tokenizer"
        )
    return model, tokenizer


def show_prompt(prompt: str, header: str) -> None:
    print(f"===== {header} =====\n{prompt}\n===== end of prompt =====", flush=True)
