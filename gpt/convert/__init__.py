"""Model directories: ``config.json`` + ``model.safetensors``, read and written.

A model directory is what ``GPT.save_pretrained`` writes and ``GPT.from_pretrained`` reads:
exports of this project, the ``model/`` folder of every checkpoint, and Hugging Face
checkpoints of a supported architecture. This module does the file work (formats, errors
that name the file, atomic writes); the per-architecture mapping of config keys and weight
names lives beside it (``gpt2.py``). It never imports the model, so the model can import it.

Only safetensors are read: a pickle (``.bin``, ``.pt``, ...) can run arbitrary code when
loaded, so it is refused rather than unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.config import ConfigError, ModelConfig
from gpt.convert import gpt2
from gpt.fileio import write_atomic

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path}: refusing to load a pickle file: unpickling can execute arbitrary code. "
        "Convert it to safetensors first (e.g. in a trusted environment, "
        "transformers' save_pretrained(..., safe_serialization=True)), then load the directory "
        "holding config.json + model.safetensors."
    )


def read_config_json(path: str | Path) -> dict:
    """The parsed ``config.json`` of model directory ``path``; ConfigError if it is not a JSON
    object."""
    file = Path(path) / CONFIG
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of model directory ``path`` (config.json only; no weights read)."""
    config_file = Path(path) / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; is this a model directory?")
    hf = read_config_json(path)
    try:
        return gpt2.config_from_hf(hf, config_file)
    except (KeyError, TypeError) as err:  # a missing key, a wrong type, a malformed value
        raise ConfigError(
            f"{config_file}: not a usable model config ({type(err).__name__}: {err})"
        ) from None


def read_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, weights in our names and layouts, the raw config.json) of a model directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ValueError(
            f"{path} is a file; pass the directory holding config.json + model.safetensors"
        )
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; is this a model directory?")
    if not weights_file.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(path / pickles[0])
        raise FileNotFoundError(
            f"{path}: no model.safetensors here (sharded checkpoints are not supported)"
        )
    hf = read_config_json(path)
    cfg = read_model_config(path)
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{weights_file}: cannot read the weights ({err}); the file is damaged or "
            "truncated: export or copy it again"
        ) from None
    return cfg, gpt2.state_from_hf(state), hf


def tokenizer_name(path: str | Path) -> str | None:
    """The encoding recorded by ``save_pretrained(..., tokenizer=...)``, or None."""
    return read_config_json(path).get("gpt_tokenizer")


def write_model_dir(
    path: str | Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: str | None = None,
) -> None:
    """Write config.json + model.safetensors, each atomically: an interrupted save never
    leaves a half-written file under a final name. ``tokenizer`` (an encoding name of
    gpt.data.tokenizer) is recorded as ``gpt_tokenizer``."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS, save(gpt2.state_to_hf(state), metadata={"format": "pt"}))
    config = gpt2.hf_config(cfg)
    if tokenizer is not None:
        config["gpt_tokenizer"] = tokenizer
    write_atomic(path / CONFIG, json.dumps(config, indent=2) + "\n")
