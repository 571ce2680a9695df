"""Model directories in Hugging Face GPT-2 layout: ``config.json`` + ``model.safetensors``.

The same layout serves two purposes: loading real GPT-2 checkpoints (any size, any
n_positions and vocabulary) and exporting our models so that
``transformers.GPT2LMHeadModel.from_pretrained`` reads them. Hugging Face's GPT-2 stores its
projections as ``Conv1D`` with weights (in, out); ours are ``nn.Linear`` (out, in), so those
four matrices are transposed on the way in and out. Our switches that GPT-2 lacks are kept
in ``config.json`` under ``"gpt_config"`` and restored on load; such models load in
transformers only when every switch has GPT-2's value.

Only safetensors are read: a pickle (``.bin``, ``.pt``, ...) can run arbitrary code when
loaded, so it is refused rather than unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt.config import ConfigError, ModelConfig
from gpt.model import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path}: refusing to load a pickle file: unpickling can execute arbitrary code. "
        "Convert it to safetensors first (e.g. in a trusted environment, "
        "transformers' save_pretrained(..., safe_serialization=True)), then load the directory "
        "holding config.json + model.safetensors."
    )


def _config_from_hf(hf: dict, path: Path) -> ModelConfig:
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


def load_pretrained(path: str | Path, **overrides) -> GPT:
    """Build a GPT from a model directory. ``overrides`` replace ModelConfig fields that do
    not change the weights' shapes (e.g. attention="naive", dropout=0.1)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ValueError(
            f"{path} is a file; pass the directory holding config.json + model.safetensors"
        )
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; is this a model directory?")
    if not weights_file.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(path / pickles[0])
        raise FileNotFoundError(
            f"{path}: no model.safetensors here (sharded checkpoints are not supported)"
        )
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: not valid JSON: {err}") from None
    cfg = dataclasses.replace(_config_from_hf(hf, config_file), **overrides)
    with torch.device("meta"):  # no time spent initialising weights that are overwritten
        model = GPT(cfg)
    state = load_file(weights_file)
    model.load_state_dict(_from_hf_state(state, model, weights_file), assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True broke the tie
    return model


def _from_hf_state(state: dict, model: GPT, file: Path) -> dict:
    out = {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    expected = dict(model.state_dict())
    wte = out.get("transformer.wte.weight")
    head = out.setdefault("lm_head.weight", wte)
    if wte is not None and not torch.equal(head, wte):
        raise ValueError(
            f"{file}: lm_head.weight differs from wte; only tied LM heads are supported"
        )
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file}: weights do not match the config: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, tensor in out.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
        out[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return out


def tokenizer_name(path: str | Path) -> str | None:
    """The encoding recorded by ``save_pretrained(..., tokenizer=...)``, or None."""
    return json.loads((Path(path) / "config.json").read_text()).get("gpt_tokenizer")


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


def save_pretrained(model: GPT, path: str | Path, tokenizer: str | None = None) -> None:
    """Write config.json + model.safetensors; each is written to a temporary name and renamed,
    so an interrupted save never leaves a half-written file under the final name.
    ``tokenizer`` (an encoding name of gpt.data.tokenizer) is recorded as ``gpt_tokenizer``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to wte: Hugging Face re-ties it on load
            continue
        tensor = tensor.detach().to("cpu")
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    tmp = path / "model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    tmp = path / "config.json.tmp"
    config = hf_config(model.cfg)
    if tokenizer is not None:
        config["gpt_tokenizer"] = tokenizer
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path / "config.json")
