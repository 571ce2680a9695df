"""The unigram baseline: what a model that ignores context scores on a data set.

It predicts every token with the token frequencies of the training split (add-one smoothed,
so unseen tokens have a finite cost); a trained model's validation loss should be well below
it. ``python -m gpt.report`` prints it beside a run's losses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt.data.shards import open_split, read_manifest


def token_counts(data_dir: Path, split: str, n_vocab: int) -> np.ndarray:
    counts = np.zeros(n_vocab, dtype=np.int64)
    for shard in open_split(data_dir, split, verify="sample"):
        counts += np.bincount(shard, minlength=n_vocab)[:n_vocab]
    return counts


def unigram_loss(data_dir: str | Path) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's token
    frequencies, with add-one smoothing."""
    data_dir = Path(data_dir)
    n_vocab = read_manifest(data_dir)["n_vocab"]
    train = token_counts(data_dir, "train", n_vocab)
    val = token_counts(data_dir, "val", n_vocab)
    if not val.sum():
        raise ValueError(f"{data_dir}: the validation split is empty; no baseline to compute")
    log_p = np.log(train + 1.0) - np.log(train.sum() + n_vocab)
    return float(-(val * log_p).sum() / val.sum())
