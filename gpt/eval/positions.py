"""Validation loss by position: how well a model predicts token t + 1 from the t + 1 tokens
before it, for t up to the evaluated length T; a table of buckets, JSON and a plot.

    python -m gpt.eval.positions --ckpt PATH [--data DIR] [--length T] [--windows N]
        [--bucket-width W] [--out positions.json] [--plot positions.png] [--compare A.json ...]

The windows are the first ``--windows`` windows of T + 1 tokens of the data set's ``val``
split, read in order with stride T (gpt/data/loader.py's sequential mode), crossing document
boundaries as training windows do. Position t's loss is the mean over windows of the
cross-entropy of target t (inputs 0..t). Buckets are powers of two, [0, 1), [1, 2), [2, 4),
..., the last one ending at T (or ``--bucket-width`` W wide); a bucket's loss is the mean of
its positions'. T may exceed ``block_size`` when the model runs longer sequences
(``model.rope_scaling``); the model itself is asked, and its refusal is reported naming
``--length``. The context-extension measurements of issue #24 (docs/long-context.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from gpt.cli.evaluate import check_output
from gpt.cli.model_flags import (
    HelpWithDefaults,
    add_context_flags,
    add_model_flags,
    check_model_flags,
    load_model,
)
from gpt.data.loader import TokenLoader, split_xy
from gpt.data.shards import read_manifest
from gpt.fileio import plot_beside, write_figure, write_output
from gpt.run import read_run

PROG = "python -m gpt.eval.positions"


@torch.no_grad()
def loss_by_position(model, loader: TokenLoader, windows: int, batch_size: int = 8,
                     progress: bool = False) -> Tensor:  # fmt: skip
    """Mean cross-entropy at each position over windows 0 .. ``windows`` - 1 of ``loader``
    (sequential mode: the same windows every time), float64 of shape (T,); the model is run
    at the loader's block_size, whatever its own."""
    device = next(model.parameters()).device
    total = torch.zeros(loader.block_size, dtype=torch.float64, device=device)
    starts = range(0, windows, batch_size)
    for at in tqdm(starts, desc="loss by position", unit="batch", disable=not progress):
        k = np.arange(at, min(at + batch_size, windows))
        x, y = (t.to(device) for t in split_xy(loader.sequences(k)))  # (B, T) each
        logits = model(x)  # (B, T, vocab)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, float64 in tests
        loss = F.cross_entropy(logits.transpose(1, 2).to(acc), y, reduction="none")  # (B, T)
        total += loss.double().sum(0)
    return total / windows


def bucket_edges(length: int, width: int | None = None) -> list[int]:
    """Bucket boundaries over positions [0, length): powers of two (0, 1, 2, 4, ...) or
    multiples of ``width``, the last bucket ending at ``length``."""
    if width is None:
        edges = [0] + [2**i for i in range(length.bit_length()) if 2**i < length]
    else:
        edges = list(range(0, length, width))
    return edges + [length]


def bucket_means(per_position: Sequence[float], edges: Sequence[int]) -> list[float]:
    """The mean of ``per_position`` over each bucket [edges[i], edges[i + 1])."""
    values = [float(v) for v in per_position]
    return [sum(values[a:b]) / (b - a) for a, b in pairwise(edges)]


def format_buckets(result: dict) -> str:
    rows = [("positions", "tokens", "loss")]
    rows += [(f"[{b['start']}, {b['end']})", str(b["tokens"]), f"{b['loss']:.4f}")
             for b in result["buckets"]]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_loss_by_position(results: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Loss against position for one or more results (``measure``'s dicts, as the JSON holds
    them): per position thin, bucket means as dots at the bucket middles; a dotted vertical
    line at each model's block_size when the length passes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results):
        name, color = r["config"].get("label") or r["config"]["ckpt"], f"C{i}"
        per_position = r["per_position"]
        ax.plot(range(len(per_position)), per_position, color=color, alpha=0.3, linewidth=0.7,
                label=f"{name}, per position")  # fmt: skip
        middles = [(b["start"] + b["end"] - 1) / 2 for b in r["buckets"]]
        ax.plot(middles, [b["loss"] for b in r["buckets"]], "o-", color=color,
                label=f"{name}, bucket mean")  # fmt: skip
        block = r["config"]["block_size"]
        if block < len(per_position):
            ax.axvline(block, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("position t (target t + 1 predicted from tokens 0..t)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "validation loss by position", fontsize=9)
    ax.legend(fontsize=7)
    return write_figure(fig, path)


def data_dir_of(ckpt: str | Path) -> Path:
    """The data set of the run ``ckpt`` is (or is a checkpoint of); ValueError otherwise."""
    path = Path(ckpt)
    for run in (path, path.parent.parent):
        if (run / "config.toml").is_file():
            return read_run(run).data_dir
    raise ValueError(f"--ckpt {ckpt} is not a training run or one of its checkpoints: give --data")


def measure(model, tokenizer, data_dir: Path, length: int, windows: int | None,
            width: int | None, batch_size: int = 8, progress: bool = True) -> dict:  # fmt: skip
    """Loss by position of ``model`` on ``data_dir``'s val split at ``length``: a dict with
    ``per_position``, ``buckets`` ({start, end, tokens, loss}) and ``mean``."""
    cfg = model.cfg
    encoding = read_manifest(data_dir)["encoding"]
    if encoding != tokenizer.name:
        raise ValueError(f"--data {data_dir}: encoded with {encoding!r}, the model's tokenizer "
                         f"is {tokenizer.name!r}")  # fmt: skip
    try:
        loader = TokenLoader(data_dir, "val", length, 1, mode="sequential", verify="sample",
                             vocab_size=cfg.vocab_size)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"--length {length}: {err}") from None
    n = loader.n_windows if windows is None else min(windows, loader.n_windows)
    try:
        per_position = loss_by_position(model, loader, n, batch_size, progress)
    except ValueError as err:  # the model's own refusal, e.g. a length past block_size
        raise ValueError(f"--length {length}: the model cannot run it: {err}") from None
    edges = bucket_edges(length, width)
    means = bucket_means(per_position, edges)
    buckets = [{"start": a, "end": b, "tokens": (b - a) * n, "loss": m}
               for (a, b), m in zip(pairwise(edges), means, strict=True)]  # fmt: skip
    return {
        "config": {"data": str(data_dir), "length": length, "windows": n, "bucket_width": width,
                   "block_size": cfg.block_size, "max_positions": cfg.max_positions,
                   "rope_scaling": cfg.rope_scaling},
        "per_position": per_position.tolist(),
        "buckets": buckets,
        "mean": float(per_position.mean()),
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults
    )
    add_model_flags(p)
    add_context_flags(p)
    p.add_argument("--data", type=Path, help="a prepared data set [default: the run's]")
    p.add_argument("--length", type=int, help="T, tokens per window [default: block_size]")
    p.add_argument("--windows", type=int, default=64, help="windows (at most the split's)")
    p.add_argument("--bucket-width", type=int, help="fixed-width buckets [default: powers of 2]")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--label", help="this model's name in the plot [default: --ckpt]")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", help="the plot [default with --out: beside it]")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                   help="earlier --out files drawn in the same plot")  # fmt: skip
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        for flag in ("length", "windows", "bucket_width", "batch_size"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        check_model_flags(args)
        if args.plot is None:
            args.plot = plot_beside(args.out)
        for flag in ("out", "plot"):
            if getattr(args, flag):
                check_output(f"--{flag}", getattr(args, flag))
        for other in args.compare:
            if not Path(other).is_file():
                raise ValueError(f"--compare {other}: no such file")
        if args.data is None:
            args.data = data_dir_of(args.ckpt)
    except ValueError as err:
        p.error(str(err))
    return args


def read_result(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--compare {path}: not JSON ({err})") from None
    keys = ("config", "per_position", "buckets")
    if not isinstance(result, dict) or not all(k in result for k in keys):
        raise ValueError(f"--compare {path}: not a {PROG} --out file (no {', '.join(keys)})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        others = [read_result(path) for path in args.compare]
        model, tokenizer = load_model(args, PROG)
        length = args.length or model.cfg.block_size
        result = measure(model, tokenizer, args.data, length, args.windows, args.bucket_width,
                         args.batch_size)  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    result["config"] = {"ckpt": str(args.ckpt), "label": args.label} | result["config"]
    print(format_buckets(result))
    print(f"mean loss {result['mean']:.4f} over {length} positions x "
          f"{result['config']['windows']} windows of {args.data}")  # fmt: skip
    if args.out:
        write_output(args.out, json.dumps(result, indent=1) + "\n")
        print(f"results written to {args.out}")
    if args.plot:
        path = plot_loss_by_position([*others, result], args.plot, title=str(args.data))
        print(f"loss by position plotted in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
