"""Model directories: ``config.json`` + ``model.safetensors``, read and written.

A model directory is what ``GPT.save_pretrained`` writes and ``GPT.from_pretrained`` reads:
exports of this project, the ``model/`` folder of every checkpoint, and Hugging Face
checkpoints of a supported architecture. This module does the file work (formats, errors
that name the file and key, atomic writes) and picks the architecture; the per-architecture
mapping of config keys and weight names lives beside it (``gpt2.py``, ``llama.py``). It
never imports the model, so the model can import it.

Three architectures, told apart by ``model_type`` in config.json:

- ``gpt2``: transformers' ``GPT2LMHeadModel`` (layernorm, pre-norm, learned positions, gelu
  or relu, biases, no GQA);
- ``llama``: transformers' ``LlamaForCausalLM`` (rmsnorm, pre-norm, rope, swiglu, no biases,
  any GQA);
- none: ours, for every other combination of switches. It claims no transformers
  architecture, so no tool loads it as something it is not; only ``from_pretrained`` reads it.

Every directory we write also holds our full ModelConfig under ``gpt_config``; on reading,
the transformers keys must agree with it. Embedding and LM-head rows are the real vocabulary
only (``vocab_size``, never the padded one). A directory written with a tokenizer holds its
Hugging Face tokenizer files too (``hf_tokenizer.py``), where that format can represent it.
Only safetensors are read: a pickle (``.bin``, ``.pt``, ...) can run arbitrary code when
loaded, so it is refused rather than unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch

from gpt import store
from gpt.config import ConfigError, ModelConfig
from gpt.convert import gpt2, hf_tokenizer, llama
from gpt.fileio import write_atomic

CONFIG = "config.json"
WEIGHTS = store.WEIGHTS
CHECKSUMS = store.CHECKSUMS  # sha256 of the weights and tokenizer files (store.write_checksums)
# every file write_model_dir writes: a directory holding only these is an export
EXPORT_FILES = (CONFIG, WEIGHTS, CHECKSUMS, *hf_tokenizer.FILES)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ARCHITECTURES = {"gpt2": gpt2, "llama": llama}  # transformers' model_type -> mapping
ARCHITECTURE_CHOICES = ("auto", "transformers", "gpt2", "llama", "gpt")  # save_pretrained's
# config.json's keys for what transformers has no key for ("gpt_": ours, not theirs): the
# whole ModelConfig, and the tokenizer's encoding name
MODEL_CONFIG_KEY = "gpt_config"
TOKENIZER_KEY = "gpt_tokenizer"
REQUIRED = object()


class ConfigKeys:
    """Typed access to a config.json object: every error names the file and the key."""

    def __init__(self, values: dict, file: Path, prefix: str = ""):
        self.values, self.file, self.prefix = values, file, prefix

    def get(self, key: str, tp: Any, default: Any = REQUIRED) -> Any:
        """``values[key]`` checked against type ``tp`` (int, float, bool, str, dict or a
        union with None); ``default`` when absent, ConfigError when absent and required."""
        if key not in self.values:
            if default is REQUIRED:
                raise ConfigError(f"{self.file}: missing key {self.prefix}{key}")
            return default
        value = self.values[key]
        if not _has_type(value, tp):
            raise ConfigError(
                f"{self.file}: {self.prefix}{key} must be {_type_name(tp)}, got {value!r}"
            )
        members = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        if float in members and isinstance(value, int):  # JSON 1 for 1.0
            value = float(value)
        return value

    def section(self, key: str) -> ConfigKeys:
        """The nested object at ``key`` (empty when absent or null)."""
        return ConfigKeys(self.get(key, dict | None, None) or {}, self.file, f"{key}.")


def _has_type(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType):
        return any(_has_type(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:  # e.g. list[str] (model.sdpa_kernels)
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if typing.get_origin(tp) is dict:  # e.g. model.rope_scaling
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _has_type(k, key) and _has_type(v, item) for k, v in value.items()
        )
    if tp in (int, float) and isinstance(value, bool):  # JSON true is not a number
        return False
    return isinstance(value, (int, float) if tp is float else tp)


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "null" if tp is type(None) else "an object"
    )


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


def _validated(cfg: ModelConfig, file: Path) -> ModelConfig:
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    return cfg


def _recorded_model_config(keys: ConfigKeys) -> ModelConfig:
    """The ModelConfig recorded under ``gpt_config``; absent fields take their defaults (an
    export older than the field)."""
    key = MODEL_CONFIG_KEY
    section = ConfigKeys(keys.get(key, dict), keys.file, f"{key}.")
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(section.values) - set(hints))
    if unknown:
        raise ConfigError(
            f"{keys.file}: unknown gpt_config keys {unknown}; valid: {', '.join(hints)}"
        )
    return ModelConfig(**{key: section.get(key, hints[key]) for key in section.values})


def parse_model_config(hf: dict, file: Path) -> tuple[ModelConfig, str]:
    """(config, architecture: "gpt2", "llama" or "gpt") of a parsed config.json. For our own
    exports the transformers keys must agree with ``gpt_config``: a hand edit of one but not
    the other would otherwise load silently wrong."""
    keys = ConfigKeys(hf, file)
    model_type = keys.get("model_type", str | None, None)
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{file}: model_type {model_type!r} is not supported; valid: "
            f"{', '.join(ARCHITECTURES)} (or a directory written by GPT.save_pretrained)"
        )
    if MODEL_CONFIG_KEY not in hf:
        if model_type is None:
            raise ConfigError(
                f"{file}: neither model_type (a transformers checkpoint: "
                f"{', '.join(ARCHITECTURES)}) nor gpt_config (written by GPT.save_pretrained)"
            )
        return _validated(ARCHITECTURES[model_type].config_from_hf(keys), file), model_type
    cfg = _validated(_recorded_model_config(keys), file)
    if model_type is None:
        return cfg, "gpt"
    mapping = ARCHITECTURES[model_type]
    problems = mapping.unsupported(cfg)
    if problems:
        raise ConfigError(
            f"{file}: model_type = {model_type!r} contradicts gpt_config: "
            f"{mapping.CLASS} cannot represent {', '.join(problems)}"
        )
    theirs = mapping.config_from_hf(keys)
    for name, key in mapping.KEYS.items():
        if getattr(theirs, name) != getattr(cfg, name):
            raise ConfigError(
                f"{file}: {key} = {getattr(theirs, name)!r} contradicts gpt_config "
                f"({name} = {getattr(cfg, name)!r}); make them agree"
            )
    return cfg, model_type


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of model directory ``path`` (config.json only; no weights read)."""
    config_file = Path(path) / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; is this a model directory?")
    return parse_model_config(read_config_json(path), config_file)[0]


def read_model_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, weights in our names and layouts (float32, the real vocabulary's rows; a tied
    LM head may be absent), the raw config.json) of a model directory."""
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
    verify_model_dir(path)
    hf = read_config_json(path)
    cfg, architecture = parse_model_config(hf, config_file)
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{weights_file}: cannot read the weights ({err}); the file is damaged or "
            "truncated: export or copy it again"
        ) from None
    if architecture in ARCHITECTURES:
        state = ARCHITECTURES[architecture].state_from_hf(state, cfg)
    state = {
        name: (t.to(torch.float32) if t.is_floating_point() else t).contiguous()
        for name, t in state.items()
    }
    return cfg, state, hf


def tokenizer_name(path: str | Path) -> str | None:
    """The encoding recorded by ``save_pretrained(..., tokenizer=...)``, or None."""
    return read_config_json(path).get(TOKENIZER_KEY)


def choose_architecture(cfg: ModelConfig, architecture: str = "auto") -> str:
    """The architecture ``save_pretrained(architecture=...)`` writes: "gpt2", "llama" or "gpt".
    ValueError naming the switches when a transformers architecture is asked for and none
    represents the model."""
    if architecture not in ARCHITECTURE_CHOICES:
        raise ValueError(
            f"architecture {architecture!r} is not valid; choose one of {ARCHITECTURE_CHOICES}"
        )
    if architecture == "gpt":
        return "gpt"
    problems = {name: mapping.unsupported(cfg) for name, mapping in ARCHITECTURES.items()}
    wanted = [architecture] if architecture in ARCHITECTURES else list(ARCHITECTURES)
    for name in wanted:
        if not problems[name]:
            return name
    if architecture == "auto":
        return "gpt"
    why = "; ".join(
        f"{ARCHITECTURES[name].CLASS} cannot represent {', '.join(problems[name])}"
        for name in wanted
    )
    raise ValueError(
        f"cannot export this model to transformers: {why}. Our own architecture "
        "('gpt') keeps every switch and GPT.from_pretrained reads it."
    )


def eos_token_id(cfg: ModelConfig, tokenizer: str | None) -> int | None:
    """The end-of-text id written to config.json: the tokenizer's, GPT-2's 50256 for its
    50257-token vocabulary when no tokenizer is known, else None (unknown)."""
    if tokenizer is not None:
        from gpt.data.tokenizer import get_tokenizer

        return get_tokenizer(tokenizer).eot
    return 50256 if cfg.vocab_size == 50257 else None


def write_model_dir(
    path: str | Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: str | None = None,
    architecture: str = "auto",
) -> str:
    """Write config.json + model.safetensors, each atomically: an interrupted save never
    leaves a half-written file under a final name. ``architecture`` as ``choose_architecture``;
    ``tokenizer`` (an encoding name of gpt.data.tokenizer) is recorded as ``gpt_tokenizer``,
    gives the end-of-text id and, where ``hf_tokenizer.unsupported`` allows, has its Hugging
    Face tokenizer files written beside the model (tokenizer files of an earlier save that
    do not fit any more are removed). Returns the architecture written."""
    from safetensors.torch import save

    chosen = choose_architecture(cfg, architecture)
    rows = {"transformer.wte.weight", "lm_head.weight"}
    ours = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the token embedding; every loader re-ties it
        tensor = tensor.detach().to("cpu")
        ours[name] = tensor[: cfg.vocab_size] if name in rows else tensor  # no padding rows
    config: dict = {}
    if chosen in ARCHITECTURES:
        mapping = ARCHITECTURES[chosen]
        ours = mapping.state_to_hf(ours, cfg)
        eos = eos_token_id(cfg, tokenizer)
        config = mapping.hf_config(cfg) | {"bos_token_id": eos, "eos_token_id": eos}
    config[MODEL_CONFIG_KEY] = dataclasses.asdict(cfg)
    if tokenizer is not None:
        config[TOKENIZER_KEY] = tokenizer
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {name: t.contiguous() for name, t in ours.items()}
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(path / WEIGHTS, save(weights, metadata={"format": "pt"}))
    checksummed = [WEIGHTS]
    written = []
    if tokenizer is not None and hf_tokenizer.unsupported(tokenizer) is None:
        try:
            written = hf_tokenizer.write_tokenizer(path, tokenizer, cfg.block_size)
            checksummed += hf_tokenizer.CHECKSUMMED
        except RuntimeError as err:  # its ranks are not cached here: the model still writes
            print(f"warning: {path}: no tokenizer files written ({err})", file=sys.stderr)
    for stale in set(hf_tokenizer.FILES) - set(written):  # another tokenizer's, or none
        (path / stale).unlink(missing_ok=True)
    write_atomic(path / CONFIG, text)
    # last: the checksums of the weights and the vocabulary (config.json is left out: editing
    # it by hand is legitimate, and read_model_dir validates every key of it)
    store.write_checksums(path, checksummed)
    return chosen


def verify_model_dir(path: Path) -> None:
    """ValueError naming the file whose sha256 differs from the sidecar ``checksums.json``
    written with it (``store.verify_model_dir`` checks it; exports made before sidecars
    existed, and Hugging Face directories, have none and pass)."""
    try:
        store.verify_model_dir(path)
    except store.CheckpointError as err:
        raise ValueError(str(err)) from None
