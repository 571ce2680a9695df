"""Summarise a training run: ``python -m gpt.report RUN_DIR [--png PATH]``.

Prints the final training and validation losses next to the unigram baseline of the run's
data (the validation loss of a model that ignores context: it predicts every token with
the token frequencies of the training split), and draws the loss curve from
``RUN_DIR/metrics.jsonl`` into ``RUN_DIR/loss.png``.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np

from gpt.data.shards import open_split, read_manifest
from gpt.train.metrics import plot_losses, read_metrics


def token_counts(data_dir: Path, split: str, n_vocab: int) -> np.ndarray:
    counts = np.zeros(n_vocab, dtype=np.int64)
    for shard in open_split(data_dir, split, verify="sample"):
        counts += np.bincount(shard, minlength=n_vocab)[:n_vocab]
    return counts


def unigram_loss(data_dir: str | Path) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's token
    frequencies, with add-one smoothing so that unseen tokens have a finite cost."""
    data_dir = Path(data_dir)
    n_vocab = read_manifest(data_dir)["n_vocab"]
    train = token_counts(data_dir, "train", n_vocab)
    val = token_counts(data_dir, "val", n_vocab)
    log_p = np.log(train + 1.0) - np.log(train.sum() + n_vocab)
    return float(-(val * log_p).sum() / val.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a train.out_dir")
    parser.add_argument("--png", type=Path, help="loss plot (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    metrics, config = args.run_dir / "metrics.jsonl", args.run_dir / "config.toml"
    for path in (metrics, config):
        if not path.is_file():
            parser.error(f"{path} does not exist: is {args.run_dir} a train.out_dir?")
    data_dir = Path(tomllib.loads(config.read_text())["data"]["dir"])
    records = read_metrics(metrics)
    if not records:
        parser.error(f"{metrics} is empty: the run has not logged a step yet")
    last = records[-1]
    evals = [r for r in records if "val_loss" in r]
    baseline = unigram_loss(data_dir)
    print(f"run {args.run_dir}: {last['step']} steps, {last['tokens']:,} tokens")
    print(f"  final training loss    {last['loss']:.3f}")
    if evals:
        print(f"  final validation loss  {evals[-1]['val_loss']:.3f} (step {evals[-1]['step']})")
    print(f"  unigram baseline       {baseline:.3f} (validation tokens of {data_dir})")
    png = args.png or args.run_dir / "loss.png"
    plot_losses(metrics, png, baseline=baseline)
    print(f"  loss curve             {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
