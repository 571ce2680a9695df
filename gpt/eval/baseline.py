"""The unigram baseline: what a model that ignores context scores on a data set.

It predicts every token with the token frequencies of the training split (add-one smoothed,
so unseen tokens have a finite cost); a trained model's validation loss should be well below
it. ``python -m gpt.report`` prints it beside a run's losses; for a run on a mixture of data
sets, ``mixture_unigram_loss`` mixes the sources' frequencies at the mixture's shares.
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


def mixture_unigram_loss(data_dirs: dict[str, str | Path], shares: dict) -> float:
    """The unigram baseline of a mixture (gpt/data/mixture.py; shares summing to 1): one set
    of token frequencies, each source's add-one smoothed training frequencies mixed at its
    share, scored on each source's validation split; those cross-entropies weighted by the
    shares, as a mixture run's ``val_loss`` weights its sources' losses."""
    dirs = {name: Path(d) for name, d in data_dirs.items()}
    shares = {name: float(share) for name, share in shares.items()}  # exact fractions too
    n_vocab = max(read_manifest(d)["n_vocab"] for d in dirs.values())
    p = np.zeros(n_vocab)
    vals = {}
    for name, d in dirs.items():
        train = token_counts(d, "train", n_vocab)
        p += shares[name] * (train + 1.0) / (train.sum() + n_vocab)
        vals[name] = token_counts(d, "val", n_vocab)
        if not vals[name].sum():
            raise ValueError(f"{d}: the validation split is empty; no baseline to compute")
    log_p = np.log(p)
    return float(sum(shares[n] * -(v * log_p).sum() / v.sum() for n, v in vals.items()))
