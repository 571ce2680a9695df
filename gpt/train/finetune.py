"""Building the model a run trains: from scratch, or from ``train.init_from`` for fine-tuning.

Fine-tuning starts from the weights of another run, an export or a Hugging Face checkpoint,
with a fresh optimizer, step 0 and a fresh data position. The model's shape is the
checkpoint's: a ``[model]`` key the config sets explicitly and that contradicts it is an
error (only the attention backend, dropout and the vocabulary padding may differ, since they
do not change the weights). On top of the loaded weights ``[finetune]`` may freeze the
embeddings and the first blocks, or add LoRA adapters (gpt/lora.py) with everything else
frozen.
"""

from __future__ import annotations

import dataclasses

import torch

from gpt.config import Config, ConfigError, ModelConfig
from gpt.convert import read_model_config
from gpt.lora import add_lora, freeze
from gpt.model import GPT
from gpt.train import checkpoint as ckpt

OVERRIDABLE = ("attention", "dropout", "vocab_multiple")  # do not change the weights


def init_model_config(cfg: Config) -> ModelConfig:
    """The model config of train.init_from, with the config's attention backend, dropout and
    padding; ConfigError naming every ``[model]`` key set in the config that contradicts it."""
    source = cfg.train.init_from
    saved = read_model_config(ckpt.resolve_model_dir(source))
    contradictions = [
        f"model.{f.name} = {getattr(cfg.model, f.name)!r} (the checkpoint has "
        f"{getattr(saved, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f"model.{f.name}" in cfg.given
        and f.name not in OVERRIDABLE
        and getattr(cfg.model, f.name) != getattr(saved, f.name)
    ]
    if contradictions:
        raise ConfigError(
            f"train.init_from = {source!r}: the model's shape comes from the checkpoint, but "
            f"the config sets {'; '.join(contradictions)}. Remove these keys from [model] "
            f"(only {', '.join('model.' + k for k in OVERRIDABLE)} may differ)"
        )
    return dataclasses.replace(saved, **{k: getattr(cfg.model, k) for k in OVERRIDABLE})


def build_model(cfg: Config) -> GPT:
    """A fresh model of ``cfg.model`` (seeded: identical on every rank), or the weights of
    train.init_from (``cfg.model`` must then be ``init_model_config(cfg)``), with the
    ``[finetune]`` freezing or LoRA adapters applied."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.init_from == "scratch":
        return GPT(cfg.model)
    m, f = cfg.model, cfg.finetune
    model = ckpt.load_model(
        cfg.train.init_from,
        attention=m.attention,
        dropout=m.dropout,
        vocab_multiple=m.vocab_multiple,
    )
    if f.lora_rank:
        torch.manual_seed(cfg.train.seed)  # the adapters' initialisation, identical on every rank
        add_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets)
    freeze(model, f.freeze_embeddings, f.freeze_blocks)
    return model
