"""The prepared data sets a run reads, and the run's config checked against them.

A run reads data.dir ("train"), finetune.replay_dir ("replay"), or instead each source of
data.mixture ("mixture/<name>"), and each data.extra_val set ("extra_val/<name>"):
``Config.data_sets`` names them by role. Their manifests (the ``manifest.json`` of
gpt/data/shards.py) must hold the model's vocabulary and at least one sequence of every split
the run reads, and the sets training reads one tokenizer; a ``ConfigError`` names the key
otherwise.
"""

from __future__ import annotations

from pathlib import Path

from gpt.config import Config, ConfigError
from gpt.data.shards import read_manifest


def read_manifests(cfg: Config) -> dict[str, dict]:
    """The manifest of every data set by its role (``Config.data_sets``): "train"
    (data.dir), "replay" and "extra_val/<name>", so no extra validation set can stand in for
    another; ConfigError naming the key when one cannot be read."""
    manifests = {}
    for role, key, directory in cfg.data_sets():
        try:
            manifests[role] = read_manifest(Path(directory))
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    return manifests


def trains_on(role: str) -> bool:
    """Whether training reads the set of ``role`` (validation sets are read by evaluation)."""
    return role in ("train", "replay") or role.startswith("mixture/")


def check_run_data(cfg: Config, manifests: dict[str, dict]) -> None:
    """ConfigError naming the key for a data set whose tokens the model's vocabulary cannot
    hold, a training set in another tokenizer than the first, or a split the run reads that
    has less than one sequence (block_size + 1 tokens)."""
    t, m = cfg.train, cfg.model
    window = m.block_size + 1  # one sequence: block_size inputs and the next token
    first = None  # (key, directory, encoding) of the first set training reads
    for role, key, directory in cfg.data_sets():
        manifest = manifests[role]
        if manifest["n_vocab"] > m.vocab_size:
            raise ConfigError(
                f"{key} = {directory} uses {manifest['encoding']} with "
                f"{manifest['n_vocab']} tokens, more than model.vocab_size = {m.vocab_size}"
            )
        if trains_on(role):
            first = first or (key, directory, manifest["encoding"])
            if manifest["encoding"] != first[2]:
                raise ConfigError(
                    f"{key} = {directory} uses {manifest['encoding']}, but {first[0]} = "
                    f"{first[1]} uses {first[2]}: the sets a run trains on must share one "
                    "tokenizer (prepare them with the same --encoding)"
                )
        splits = ["train"] if role == "replay" else ["train", "val"] if trains_on(role) else ["val"]
        if not t.eval_interval:
            splits = [s for s in splits if s == "train"]
        for split in splits:
            tokens = manifest["splits"].get(split, {}).get("tokens", 0)
            if tokens < window:
                need = "set train.eval_interval = 0 or " if split == "val" else ""
                raise ConfigError(
                    f"{key} = {directory}: split {split!r} has {tokens} tokens, fewer than "
                    f"one sequence of model.block_size + 1 = {window}; {need}prepare "
                    "more data (or a smaller model.block_size)"
                )
