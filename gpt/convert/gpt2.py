"""Hugging Face GPT-2 <-> our GPT: the config and the weight names (a pure mapping, no I/O).

The GPT-2 layout serves two purposes: loading real GPT-2 checkpoints (any size, any
n_positions and vocabulary) and exporting our models so that
``transformers.GPT2LMHeadModel.from_pretrained`` reads them. Hugging Face's GPT-2 stores its
projections as ``Conv1D`` with weights (in, out); ours are ``nn.Linear`` (out, in), so those
four matrices are transposed on the way in and out. Our switches that GPT-2 lacks are kept
in ``config.json`` under ``"gpt_config"`` and restored on load; such models load in
transformers only when every switch has GPT-2's value.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt.config import ConfigError, ModelConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def config_from_hf(hf: dict, path: Path) -> ModelConfig:
    """Map a Hugging Face GPT2Config dict (or our own export) to a ModelConfig."""
    if "gpt_config" in hf:  # exported by this project: every switch recorded
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(hf["gpt_config"]) - known
        if unknown:
            raise ConfigError(
                f"{path}: unknown gpt_config keys {sorted(unknown)}; valid: {sorted(known)}"
            )
        return ModelConfig(**hf["gpt_config"])
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{path}: model_type {hf['model_type']!r} is not supported; only gpt2")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{path}: activation_function {act!r} is not supported; valid: {sorted(ACTIVATIONS)}"
        )
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise ConfigError(f"{path}: {key} = true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError(f"{path}: scale_attn_weights = false is not supported")
    dropout = hf.get("resid_pdrop", 0.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        mlp=ACTIVATIONS[act],
        mlp_hidden_dim=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=dropout,
    )


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weight names and layouts -> ours (float32, contiguous). A missing
    ``lm_head.weight`` is the tied token embedding."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        out[name] = out[name].contiguous()
    if "transformer.wte.weight" in out:
        out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights -> Hugging Face GPT-2's (CPU, contiguous); the tied head is left out."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":  # tied to wte: Hugging Face re-ties it on load
            continue
        tensor = tensor.detach().to("cpu")
        out[name] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """config.json contents: GPT-2's keys plus our full ModelConfig under gpt_config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_hidden,
        "activation_function": "relu" if cfg.mlp == "relu" else "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "bos_token_id": cfg.vocab_size - 1,
        "eos_token_id": cfg.vocab_size - 1,
        "tie_word_embeddings": True,
        "gpt_config": dataclasses.asdict(cfg),
    }
