"""Summarise a training run: ``python -m gpt.report RUN_DIR [--png PATH]``.

Prints the final training and validation losses next to the unigram baseline of the run's
data (gpt/eval/baseline.py), the tokens and epochs of each source of a mixture (or replay),
and draws the loss curves from ``RUN_DIR/metrics.jsonl`` into ``RUN_DIR/loss.png``: training
loss and every validation set (a fine-tuning run's domain and general sets, a mixture's
sources, as curves of their own). Works from any directory: the run's relative paths resolve
against the directory it was started from (recorded in ``RUN_DIR/run.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt.data.mixture import exact_weights
from gpt.eval.baseline import mixture_unigram_loss, unigram_loss
from gpt.run import read_run
from gpt.train.metrics import is_number, plot_losses, read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a train.out_dir")
    parser.add_argument("--png", type=Path, help="loss plot (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        run = read_run(args.run_dir)
    except ValueError as err:
        parser.error(str(err))
    if not run.metrics.is_file():
        parser.error(f"{run.metrics} does not exist: the run has not logged a step yet")
    records = read_metrics(run.metrics)
    if not records:
        parser.error(f"{run.metrics} is empty: the run has not logged a step yet")
    trained = [r for r in records if is_number(r.get("loss"))]
    evals = [r for r in records if is_number(r.get("val_loss"))]
    tokens = records[-1].get("tokens")
    seen = f"{tokens:,} tokens" if is_number(tokens) else "tokens not recorded"
    print(f"run {args.run_dir}: {records[-1]['step']} steps, {seen}")
    if trained:
        print(f"  final training loss    {trained[-1]['loss']:.3f}")
    if evals:
        last = evals[-1]
        print(f"  final validation loss  {last['val_loss']:.3f} (step {last['step']})")
        for key in sorted(k for k in last if k.startswith("val_loss/") and is_number(last[k])):
            start = next((r[key] for r in evals if key in r), None)
            first = f"{start:.3f}" if is_number(start) else "not recorded"
            print(f"    {key:<24}{last[key]:.3f} (step {evals[0]['step']}: {first})")
    print_sources(records)
    try:
        mixture = run.config.data.mixture
        if mixture:
            baseline = mixture_unigram_loss(run.data_dirs, exact_weights(mixture))
            shown = f"the mixture of {', '.join(mixture)}"
        else:
            baseline = unigram_loss(run.data_dir)
            shown = run.data_dir  # relative to here when it is below here, as configs write it
            if shown.is_relative_to(Path.cwd()):
                shown = shown.relative_to(Path.cwd())
        print(f"  unigram baseline       {baseline:.3f} (validation tokens of {shown})")
    except ValueError as err:  # the data moved or has no validation split
        baseline = None
        print(f"  unigram baseline       unavailable: {err}")
    png = args.png or args.run_dir / "loss.png"
    # a named main validation set (data.name) is plotted once, under its name
    skip = {"val_loss"} if run.config.data.name else set()
    plot_losses(run.metrics, png, baseline=baseline, skip=skip)
    print(f"  loss curves            {png}")
    return 0


def print_sources(records: list[dict]) -> None:
    """A mixture's (or replay's) last recorded tokens and epochs per source
    (``tokens/<name>``, ``epochs/<name>`` of metrics.jsonl), with each one's part of the
    tokens."""
    last = next((r for r in reversed(records) if any(k.startswith("tokens/") for k in r)), None)
    if last is None:
        return
    tokens = {k.removeprefix("tokens/"): v for k, v in last.items() if k.startswith("tokens/")}
    total = sum(tokens.values()) or 1
    print(f"  tokens by source       (step {last['step']}; epochs: passes over its training split)")
    for name, count in tokens.items():
        epochs = last.get(f"epochs/{name}")
        seen = f", {epochs:.2f} epochs" if is_number(epochs) else ""
        print(f"    {name:<20}{count:>14,} ({count / total:.1%}{seen})")


if __name__ == "__main__":
    sys.exit(main())
