"""Hugging Face Llama <-> our GPT: the config and the weight names (a pure mapping, no I/O).

Llama (Touvron et al. 2023) is our GPT with rmsnorm, pre-norm, rotary positions in the
"rotate half" pairing (x[i], x[i + D/2]), a SwiGLU MLP, no biases and any number of key/value
heads (grouped-query attention): the layout ``transformers.LlamaForCausalLM`` reads, and the
one most other tools read too. The matrices are the same ``nn.Linear`` (out, in) on both
sides; only the fused ones are split and joined: our ``c_attn`` is [q; k; v] stacked on the
output dimension, our SwiGLU ``c_fc`` is [gate; up].

``model.rope_scaling`` is transformers' ``rope_parameters`` (``rope_scaling`` in transformers
4) with ``type`` for ``rope_type``: the same formulas (gpt/rope.py). transformers' ``dynamic``
scales from ``max_position_embeddings``, so a dynamic model exports only when its block_size
is its original length; the other types keep ``max_position_embeddings = block_size`` and
carry the original length in the parameters (and at the top level, where ``linear`` reads
nothing but transformers keeps it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from gpt.config import ConfigError, ModelConfig
from gpt.rope import OPTIONAL_KEYS, SCALING_TYPES, resolve_scaling

if TYPE_CHECKING:
    from gpt.convert import ConfigKeys

CLASS = "LlamaForCausalLM"
FIXED = {
    "norm": "rmsnorm",
    "norm_position": "pre",
    "position_encoding": "rope",
    "mlp": "swiglu",
    "bias": False,
}
# ModelConfig attribute -> the config.json key that holds it
KEYS = {
    "vocab_size": "vocab_size",
    "block_size": "max_position_embeddings",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "kv_heads": "num_key_value_heads",
    "mlp_hidden": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_parameters.rope_theta",
    "resolved_rope_scaling": "rope_parameters",
    "tie_embeddings": "tie_word_embeddings",
}
TOP = {  # ours -> theirs, outside the layers
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {  # ours -> theirs, inside layer N, for the matrices that are not split
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def unsupported(cfg: ModelConfig) -> list[str]:
    """Our switches that Llama cannot represent, as "key = value (Llama: valid)"."""
    problems = [
        f"{key} = {getattr(cfg, key)!r} (Llama: {value!r})"
        for key, value in FIXED.items()
        if getattr(cfg, key) != value
    ]
    scaling = cfg.resolved_rope_scaling if cfg.position_encoding == "rope" else {}
    original = scaling.get("original_max_position_embeddings")
    if scaling.get("type") == "dynamic" and original != cfg.block_size:
        problems.append(
            f"rope_scaling type 'dynamic' with original_max_position_embeddings = {original} "
            f"!= block_size = {cfg.block_size} (Llama: dynamic NTK scales from "
            "max_position_embeddings, which holds both)"
        )
    return problems


def scaling_from_hf(keys: ConfigKeys) -> dict:
    """model.rope_scaling of a Llama config.json ({}: none); ConfigError naming what is not
    supported."""
    # transformers 5 writes rope_parameters; 4 wrote rope_theta and rope_scaling
    rope, scaling = keys.section("rope_parameters"), keys.section("rope_scaling")
    params = scaling if scaling.values else rope
    kind = params.get("rope_type", str, params.get("type", str, None))
    if kind in (None, "default"):
        return {}
    if kind not in SCALING_TYPES:
        raise ConfigError(
            f"{keys.file}: rope_type {kind!r} (rotary scaling) is not supported; valid: "
            f"'default', {', '.join(map(repr, SCALING_TYPES))}"
        )
    if params.get("partial_rotary_factor", float, 1.0) != 1.0:
        raise ConfigError(f"{keys.file}: partial_rotary_factor != 1 is not supported")
    max_positions = keys.get("max_position_embeddings", int, 2048)
    original = keys.get("original_max_position_embeddings", int, max_positions)
    if kind != "dynamic":  # transformers' dynamic scales from max_position_embeddings
        original = params.get("original_max_position_embeddings", int, original)
    out = {"type": kind, "factor": params.get("factor", float)}
    out["original_max_position_embeddings"] = max_positions if kind == "dynamic" else original
    for key in OPTIONAL_KEYS[kind]:
        value = params.values.get(key)
        if value is not None:
            out[key] = value
    try:
        resolve_scaling(out)
    except ValueError as err:
        raise ConfigError(f"{keys.file}: {err}") from None
    return out


def config_from_hf(keys: ConfigKeys) -> ModelConfig:
    """Map a Hugging Face LlamaConfig (config.json, transformers 4 or 5) to a ModelConfig."""
    file = keys.file
    act = keys.get("hidden_act", str, "silu")
    if act != "silu":
        raise ConfigError(f"{file}: hidden_act {act!r} is not supported; valid: 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if keys.get(key, bool, False):
            raise ConfigError(f"{file}: {key} = true is not supported (Llama has no biases)")
    rope = keys.section("rope_parameters")
    hidden, heads = keys.get("hidden_size", int), keys.get("num_attention_heads", int)
    head_dim = keys.get("head_dim", int | None, None)
    if head_dim is not None and head_dim * heads != hidden:
        raise ConfigError(
            f"{file}: head_dim = {head_dim} is not supported; it must be hidden_size / "
            f"num_attention_heads = {hidden / heads:g}"
        )
    return ModelConfig(
        vocab_size=keys.get("vocab_size", int),
        block_size=keys.get("max_position_embeddings", int, 2048),
        n_layer=keys.get("num_hidden_layers", int),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=keys.get("num_key_value_heads", int | None, None),
        mlp_hidden_dim=keys.get("intermediate_size", int),
        norm_eps=keys.get("rms_norm_eps", float, 1e-6),
        rope_theta=rope.get("rope_theta", float, keys.get("rope_theta", float, 10000.0)),
        rope_scaling=scaling_from_hf(keys),
        tie_embeddings=keys.get("tie_word_embeddings", bool, False),
        dropout=0.0,
        **FIXED,
    )


def _splits(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    head_dim = cfg.n_embd // cfg.n_head
    kv = cfg.kv_heads * head_dim
    return [cfg.n_embd, kv, kv], [cfg.mlp_hidden, cfg.mlp_hidden]


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weight names -> Llama's, c_attn split into q, k, v and c_fc into gate, up."""
    qkv_rows, gate_up_rows = _splits(cfg)
    out = {}
    for name, tensor in state.items():
        layer = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        if layer is None:
            out[TOP[name]] = tensor
            continue
        prefix, rest = f"model.layers.{layer[1]}.", layer[2]
        if rest in LAYER:
            out[prefix + LAYER[rest]] = tensor
            continue
        parts = {"attn.c_attn.weight": (QKV, qkv_rows), "mlp.c_fc.weight": (GATE_UP, gate_up_rows)}
        names, rows = parts[rest]
        for part, piece in zip(names, tensor.split(rows), strict=True):
            out[prefix + part] = piece
    return out


def state_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's weight names -> ours. Names we do not know are kept as they are, so that the
    loader reports them; q, k, v (gate, up) are joined only when all are present."""
    top, in_layer = {v: k for k, v in TOP.items()}, {v: k for k, v in LAYER.items()}
    out, fused = {}, {}
    for key, tensor in state.items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if layer is None:
            out[top.get(key, key)] = tensor
        elif layer[2] in in_layer:
            out[f"transformer.h.{layer[1]}.{in_layer[layer[2]]}"] = tensor
        elif layer[2] in QKV + GATE_UP:
            fused.setdefault(layer[1], {})[layer[2]] = tensor
        elif not layer[2].endswith("rotary_emb.inv_freq"):  # old checkpoints' buffer
            out[key] = tensor
    for i, parts in fused.items():
        for ours, names in (("attn.c_attn.weight", QKV), ("mlp.c_fc.weight", GATE_UP)):
            if all(n in parts for n in names):
                out[f"transformer.h.{i}.{ours}"] = torch.cat([parts.pop(n) for n in names])
        out.update({f"model.layers.{i}.{name}": t for name, t in parts.items()})
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """config.json contents a LlamaForCausalLM reads, in transformers 5's keys and 4's
    (rope_theta, rope_scaling): both read it (token ids are added by the caller)."""
    scaling = {k: v for k, v in cfg.resolved_rope_scaling.items() if k != "type"}
    rope = {"rope_type": cfg.resolved_rope_scaling.get("type", "default")}
    rope |= {"rope_theta": cfg.rope_theta, **scaling}
    if rope["rope_type"] in ("linear", "dynamic"):  # not theirs: at the top level (docstring)
        rope.pop("original_max_position_embeddings")
    config = {
        "architectures": [CLASS],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if scaling:  # transformers 4's key; 5 reads it first, so it must say the same
        config["rope_scaling"] = dict(rope)
        config["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return config
