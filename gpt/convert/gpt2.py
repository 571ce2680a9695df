"""Hugging Face GPT-2 <-> our GPT: the config and the weight names (a pure mapping, no I/O).

The GPT-2 layout serves two purposes: loading real GPT-2 checkpoints (any size, any
n_positions and vocabulary) and exporting our models whose switches GPT-2 has, so that
``transformers.GPT2LMHeadModel.from_pretrained`` reads them. Hugging Face's GPT-2 stores its
projections as ``Conv1D`` with weights (in, out); ours are ``nn.Linear`` (out, in), so those
four matrices are transposed on the way in and out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from gpt.convert import ConfigKeys

CLASS = "GPT2LMHeadModel"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
# switches GPT-2 has one value of: ours must have it to export as GPT-2
FIXED = {"norm": "layernorm", "norm_position": "pre", "position_encoding": "learned", "bias": True}
# ModelConfig attribute -> the config.json key that holds it
KEYS = {
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "mlp": "activation_function",
    "mlp_hidden": "n_inner",
    "norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
}


def unsupported(cfg: ModelConfig) -> list[str]:
    """Our switches that GPT-2 cannot represent, as "key = value (GPT-2: valid)"."""
    out = [
        f"{key} = {getattr(cfg, key)!r} (GPT-2: {value!r})"
        for key, value in FIXED.items()
        if getattr(cfg, key) != value
    ]
    if cfg.mlp == "swiglu":
        out.append("mlp = 'swiglu' (GPT-2: 'gelu' or 'relu')")
    if cfg.kv_heads != cfg.n_head:
        out.append(f"n_kv_head = {cfg.n_kv_head} (GPT-2: n_head = {cfg.n_head})")
    return out


def config_from_hf(keys: ConfigKeys) -> ModelConfig:
    """Map a Hugging Face GPT2Config (config.json) to a ModelConfig."""
    act = keys.get("activation_function", str, "gelu_new")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{keys.file}: activation_function {act!r} is not supported; "
            f"valid: {sorted(ACTIVATIONS)}"
        )
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if keys.get(key, bool, False):
            raise ConfigError(f"{keys.file}: {key} = true is not supported")
    if not keys.get("scale_attn_weights", bool, True):
        raise ConfigError(f"{keys.file}: scale_attn_weights = false is not supported")
    return ModelConfig(
        vocab_size=keys.get("vocab_size", int),
        block_size=keys.get("n_positions", int, keys.get("n_ctx", int, 1024)),
        n_layer=keys.get("n_layer", int),
        n_head=keys.get("n_head", int),
        n_embd=keys.get("n_embd", int),
        mlp=ACTIVATIONS[act],
        mlp_hidden_dim=keys.get("n_inner", int | None, None),
        norm_eps=keys.get("layer_norm_epsilon", float, 1e-5),
        dropout=keys.get("resid_pdrop", float, 0.0),
        tie_embeddings=keys.get("tie_word_embeddings", bool, True),
    )


def state_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weight names and layouts -> ours."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        out[name] = tensor.t() if name.endswith(CONV1D) else tensor
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weight names and layouts -> Hugging Face GPT-2's (Conv1D transposed)."""
    return {name: t.t() if name.endswith(CONV1D) else t for name, t in state.items()}


def hf_config(cfg: ModelConfig) -> dict:
    """config.json contents a GPT2LMHeadModel reads (token ids are added by the caller)."""
    return {
        "architectures": [CLASS],
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
        "tie_word_embeddings": cfg.tie_embeddings,
    }
