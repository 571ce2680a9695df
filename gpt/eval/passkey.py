"""Passkey retrieval (Mohtashami & Jaggi 2023): can a model find a five-digit key hidden at a
chosen depth in filler text? Accuracy by length x depth, as JSON, a table and a heat map.

    python -m gpt.eval.passkey --ckpt PATH [--lengths T [T ...]] [--depths D [D ...]]
        [--trials 10] [--seed 0] [--out passkey.json] [--plot passkey.png]

Each cell (a length in tokens of the model's tokenizer, a depth in [0, 1]) runs ``--trials``
prompts (gpt/data/passkey.py) with distinct keys drawn from (seed, length, depth). A trial is
right when the greedy continuation's leading digits are the key exactly: a prefix of it, a
longer number or no digits at all are wrong. A length longer than the model runs
(``block_size``, or the positions of ``model.rope_scaling``) is refused before any work.

A command of its own rather than a ``python -m gpt.eval`` task file: its grid is lengths x
depths, not tasks x shots, and its result is a heat map; ``--ckpt``, ``--tokenizer``,
``--attention`` and ``--device`` are the same flags (gpt/cli/model_flags.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from gpt.cli.evaluate import check_output
from gpt.cli.model_flags import (
    HelpWithDefaults,
    add_context_flags,
    add_model_flags,
    check_model_flags,
    load_model,
)
from gpt.data.passkey import draw_keys, passkey_prompt, shortest_length
from gpt.fileio import plot_beside, write_figure, write_output
from gpt.generate import generate

PROG = "python -m gpt.eval.passkey"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEADING_DIGITS = re.compile(r"\s*(\d+)")


def grade(output: str, key: str) -> bool:
    """Whether generated ``output`` starts (after spaces) with exactly the digits of ``key``:
    the whole run of leading digits must equal it."""
    match = LEADING_DIGITS.match(output)
    return match is not None and match[1] == key


def check_lengths(lengths: Sequence[int], tokenizer, max_positions: int, block_size: int) -> None:
    """ValueError naming --lengths for a length the model cannot run or no prompt fits."""
    low = shortest_length(tokenizer)
    runs = f"block_size {block_size}"
    if max_positions > block_size:
        runs = f"the {max_positions} positions of its model.rope_scaling"
    if max_positions < low:  # no length is valid: say so, not "valid: 103 to 16"
        raise ValueError(
            f"the model runs at most {max_positions} positions ({runs}), fewer than the "
            f"shortest passkey prompt and answer ({low} tokens of {tokenizer.name!r}); it needs "
            f"{low} or more (a rotary model runs more with --block-size or --rope-scaling)"
        )
    for length in lengths:
        if length > max_positions:
            raise ValueError(
                f"--lengths {length}: longer than the model runs ({runs}); "
                f"valid: {low} to {max_positions}"
            )
        if length < low:
            raise ValueError(
                f"--lengths {length}: shorter than the shortest passkey prompt and answer "
                f"({low} tokens of {tokenizer.name!r}); valid: {low} to {max_positions}"
            )


@torch.no_grad()
def run_cell(model, tokenizer, length: int, depth: float, trials: int, seed: int,
             batch_size: int = 16) -> dict:  # fmt: skip
    """``trials`` prompts of ``length`` tokens with the key at ``depth``, greedily answered;
    the cell's accuracy and one record per trial."""
    keys = draw_keys(trials, f"passkey:{seed}:{length}:{depth}")
    prompts = [passkey_prompt(tokenizer, length, depth, key) for key in keys]
    outputs: list[str] = [""] * trials
    device = next(model.parameters()).device
    # one batch per (prompt tokens, answer tokens): BPE keys differ in length
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(p.ids), p.answer_tokens), []).append(i)
    for (_, new), members in groups.items():
        for at in range(0, len(members), batch_size):
            chunk = members[at : at + batch_size]
            idx = torch.tensor([prompts[i].ids for i in chunk], device=device)
            out = generate(model, idx, new, temperature=0.0, vocab_size=tokenizer.n_vocab)
            for i, row in zip(chunk, out[:, idx.shape[1] :].tolist(), strict=True):
                outputs[i] = tokenizer.decode(row)
    records = [
        {"key": p.key, "prompt_tokens": len(p.ids), "key_token": p.key_token,
         "output": out, "correct": grade(out, p.key)}
        for p, out in zip(prompts, outputs, strict=True)
    ]  # fmt: skip
    correct = sum(r["correct"] for r in records)
    return {"length": length, "depth": depth, "trials": trials, "correct": correct,
            "accuracy": correct / trials, "records": records}  # fmt: skip


def run_grid(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
             seed: int, batch_size: int = 16, progress: bool = True) -> list[dict]:  # fmt: skip
    """Every (length, depth) cell, lengths outer; see ``run_cell``."""
    cells = [(n, d) for n in lengths for d in depths]
    bar = tqdm(cells, desc="passkey", unit="cell", disable=not progress)
    return [run_cell(model, tokenizer, n, d, trials, seed, batch_size) for n, d in bar]


def accuracy_grid(cells: list[dict], lengths: Sequence[int], depths: Sequence[float]):
    """Accuracy as rows of lengths x columns of depths."""
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    return [[acc[n, d] for d in depths] for n in lengths]


def format_grid(cells: list[dict], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """A table: one row per length, one column per depth, accuracy in percent."""
    rows = [["length \\ depth", *(f"{d:g}" for d in depths)]]
    grid = accuracy_grid(cells, lengths, depths)
    rows += [
        [str(n), *(f"{100 * a:.0f}%" for a in row)] for n, row in zip(lengths, grid, strict=True)
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_heat_map(cells: list[dict], lengths: Sequence[int], depths: Sequence[float],
                  path: str | Path, title: str = "") -> Path:  # fmt: skip
    """Accuracy as a heat map: depth across, length down (shortest at the top), each cell
    annotated with its percentage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = accuracy_grid(cells, lengths, depths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.5 * len(lengths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key (fraction of the filler before it)")
    ax.set_ylabel("length (tokens)")
    trials = cells[0]["trials"] if cells else 0
    ax.set_title(f"{title}\npasskey accuracy, {trials} trials per cell".strip(), fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    return write_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults
    )
    add_model_flags(p)
    add_context_flags(p)
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        metavar="T",
        help="prompt + answer lengths in tokens of the model's tokenizer [default: a quarter, "
        "half and all of the positions the model runs]",
    )
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=list(DEPTHS),
        metavar="D",
        help="where the key goes: 0 before all the filler, 1 right before the question",
    )
    p.add_argument("--trials", type=int, default=10, help="prompts per cell, distinct keys")
    p.add_argument("--seed", type=int, default=0, help="the keys")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", metavar="PNG", help="heat map [default with --out: beside it]")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.lengths is not None and len(args.lengths) != len(set(args.lengths)):
            raise ValueError(f"--lengths lists a length twice: {args.lengths}")
        bad = [d for d in args.depths if not 0 <= d <= 1]
        if bad:
            raise ValueError(f"--depths must be in [0, 1], got {bad[0]:g}")
        if len(args.depths) != len(set(args.depths)):
            raise ValueError(f"--depths lists a depth twice: {args.depths}")
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_model_flags(args)
        if args.plot is None:
            args.plot = plot_beside(args.out)
        for flag in ("out", "plot"):  # found now, not after the whole grid
            if getattr(args, flag):
                check_output(f"--{flag}", getattr(args, flag))
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args, PROG)
        cfg = model.cfg
        if args.lengths is None:
            low = shortest_length(tokenizer)
            quarters = (cfg.max_positions // 4, cfg.max_positions // 2, cfg.max_positions)
            args.lengths = sorted({n for n in quarters if n >= low}) or [cfg.max_positions]
        check_lengths(args.lengths, tokenizer, cfg.max_positions, cfg.block_size)
        start = time.perf_counter()
        cells = run_grid(
            model, tokenizer, args.lengths, args.depths, args.trials, args.seed, args.batch_size
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_grid(cells, args.lengths, args.depths))
    mean = sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells)
    print(f"{len(cells)} cells x {args.trials} trials, mean accuracy {100 * mean:.1f}%, "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    if args.out:
        keys = ("ckpt", "lengths", "depths", "trials", "seed")
        config = {k: getattr(args, k) for k in keys} | {"tokenizer": tokenizer.name}
        config |= {"block_size": cfg.block_size, "max_positions": cfg.max_positions,
                   "rope_scaling": cfg.rope_scaling}  # fmt: skip
        report = {"config": config, "accuracy": accuracy_grid(cells, args.lengths, args.depths),
                  "cells": cells}  # fmt: skip
        write_output(args.out, json.dumps(report, indent=1) + "\n")
        print(f"results written to {args.out}")
    if args.plot:
        path = plot_heat_map(cells, args.lengths, args.depths, args.plot, title=str(args.ckpt))
        print(f"heat map written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
