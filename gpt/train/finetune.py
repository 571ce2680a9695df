"""Building the model a run trains: from scratch, or from ``train.init_from`` for fine-tuning.

Fine-tuning starts from the weights of another run, an export or a Hugging Face checkpoint,
with a fresh optimizer, step 0 and a fresh data position. The model's shape is the
checkpoint's: a ``[model]`` key the config sets explicitly and that contradicts it is an
error; only the attention backend, dropout and the vocabulary padding may be set otherwise
(they do not change the weights), and they too default to the checkpoint's. On top of the
loaded weights ``[finetune]`` may freeze the embeddings and the first blocks, or add LoRA
adapters (gpt/lora.py) with everything else frozen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt import store
from gpt.config import COMPUTE_KEYS, Config, ConfigError, ModelConfig
from gpt.convert import read_model_config
from gpt.lora import add_lora, freeze
from gpt.model import GPT

OVERRIDABLE = (*COMPUTE_KEYS, "vocab_multiple", "rope_scaling")  # change no weight


def overridable(m: ModelConfig) -> tuple[str, ...]:
    """The [model] keys fine-tuning may set on a base of ``m``: those that change no weight,
    and block_size for a rotary model (positions are computed, not learned: a longer
    context is context extension, docs/long-context.md)."""
    return (*OVERRIDABLE, "block_size") if m.position_encoding == "rope" else OVERRIDABLE


def init_model_config(cfg: Config) -> ModelConfig:
    """The model config of train.init_from. Keys that do not change the weights (attention
    backend and SDPA kernels, dropout, the chunked loss, padding, rotary scaling; a rotary
    model's block_size) take the config's value where it sets them; ConfigError naming
    every other ``[model]`` key the config sets that contradicts the checkpoint."""
    source = cfg.train.init_from
    if not Path(source).exists():
        raise ConfigError(
            f"train.init_from = {source!r}: no such file or directory; give a run directory, "
            "a checkpoint, an exported model/ directory, or 'scratch'"
        )
    try:  # a LoRA run or checkpoint: its (pinned) base's shape, which the merge keeps
        saved = read_model_config(store.model_dir_of(source))
    except (FileNotFoundError, ValueError, store.CheckpointError) as err:
        raise ConfigError(f"train.init_from = {source!r}: {err}") from None
    given = {f.name for f in dataclasses.fields(ModelConfig) if f"model.{f.name}" in cfg.given}
    contradictions = [
        f"model.{k} = {getattr(cfg.model, k)!r} (the checkpoint has {getattr(saved, k)!r})"
        for k in sorted(given - set(overridable(saved)))
        if getattr(cfg.model, k) != getattr(saved, k)
    ]
    if contradictions:
        raise ConfigError(
            f"train.init_from = {source!r}: the model's shape comes from the checkpoint, but "
            f"the config sets {'; '.join(contradictions)}. Remove these keys from [model] "
            f"(only {', '.join('model.' + k for k in overridable(saved))} may differ)"
        )
    return dataclasses.replace(
        saved, **{k: getattr(cfg.model, k) for k in given & set(overridable(saved))}
    )


def init_pin(cfg: Config) -> dict | None:
    """The exact weights train.init_from names now (``store.pin``: a run directory resolves to
    its latest checkpoint); None for a run from scratch."""
    if cfg.train.init_from == "scratch":
        return None
    try:
        return store.pin(cfg.train.init_from)
    except (FileNotFoundError, store.CheckpointError) as err:
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r}: {err}") from None


def build_model(cfg: Config, pin: dict | None = None) -> GPT:
    """A fresh model of ``cfg.model`` (seeded: identical on every rank), or the weights of
    train.init_from (``cfg.model`` must then be ``init_model_config(cfg)``; ``pin`` its
    ``init_pin``, so that the weights loaded are the ones pinned), with the ``[finetune]``
    freezing or LoRA adapters applied; train.activation_checkpointing set on it."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.init_from == "scratch":
        model = GPT(cfg.model)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        return model
    m, f = cfg.model, cfg.finetune
    pin = pin or init_pin(cfg)
    try:
        model = store.load_model(pin["path"], **{k: getattr(m, k) for k in overridable(m)})
    except store.CheckpointError as err:
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r}: {err}") from None
    if f.lora_rank:
        torch.manual_seed(cfg.train.seed)  # the adapters' initialisation, identical on every rank
        add_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets)
    freeze(model, f.freeze_embeddings, f.freeze_blocks)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model
