"""DeepSpeed's checkpoints: saving and loading them (when to save, what to keep and whether
a checkpoint may be resumed is gpt/train/checkpointer.py's).

A checkpoint of a run (the run directory: gpt/run.py; reading checkpoints back verified,
for every tool: gpt/store.py) holds::

    checkpoints/step_00000100/
        ds/                               DeepSpeed's own (model, optimizer, scheduler)
        trainer.json                      step, tokens, data loader state, versions, config
        universal/                        the same training state whole, per parameter, for
                                          any number of processes (gpt/train/universal.py)
        rng_rank{r}.json                  RNG states of python, numpy and torch per rank
                                          (gpt/train/rng.py)
        model/                            config.json + model.safetensors (GPT.from_pretrained)
        adapters/                         instead of model/ in a LoRA run: the adapters only,
                                          and which base they adapt (load_model merges them)
        checksums.json                    sha256 of every file above
        COMPLETE                          written last, after every rank finished

A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed once ``COMPLETE`` is in
it, so a kill at any moment leaves either the old checkpoints only or the new one whole.
Loading never unpickles code: DeepSpeed's ``.pt`` files are read with
``torch.load(weights_only=True)`` and a short allow-list of DeepSpeed's own plain classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

from gpt.fileio import write_atomic
from gpt.store import (
    ADAPTERS,
    CHECKPOINTS,
    COMPLETE,
    LATEST,
    CheckpointError,
    checkpoint_name,
    is_complete,
    verify_checksums,
    write_checksums,
)
from gpt.train import dist
from gpt.train.engine import full_parameters
from gpt.train.rng import read_rng_state, rng_state, set_rng_state
from gpt.train.universal import (
    UniversalStateError,
    load_universal,
    save_universal,
    supported,
)

TRAINER_STATE = "trainer.json"
ASIDE = ".aside"  # suffix of a checkpoint the trainer found damaged and set aside
# how torch.save's C++ writer reports a full disk or a failed write (a RuntimeError)
TORCH_SAVE_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "file write failed")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, permissions); the partial one was
    removed and the previous checkpoints are intact."""


# ------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------


def parameters_finite(model: torch.nn.Module) -> bool:
    """True on every rank when no rank holds a NaN or infinite parameter."""
    # under ZeRO-3 a parameter is empty here and this rank's slice of it is p.ds_tensor
    local = [getattr(p, "ds_tensor", p) for p in model.parameters()]
    ok = torch.stack([torch.isfinite(p).all() for p in local]).all().float().reshape(1)
    return dist.all_reduce(ok, "min").item() == 1.0


def save_checkpoint(
    engine,
    out_dir: str | Path,
    step: int,
    trainer_state: dict,
    tokenizer: str | None = None,
    adapters: dict | None = None,
    universal_from: torch.optim.Optimizer | None = None,
) -> Path:
    """Collective: every rank calls it. Writes the checkpoint of ``step`` under a temporary
    name, records the checksums, marks it COMPLETE once every rank finished, renames it and
    points ``latest`` at it (pruning is ``prune_checkpoints``, the trainer's call). Refuses
    (RuntimeError) non-finite parameters. ``adapters`` (LoRA: rank, alpha, targets, base)
    saves the adapters and their optimizer state only, not the frozen base. With
    ``universal_from`` (the optimizer the engine was built with) it also writes
    ``universal/``, the state any number of processes can resume."""
    model = engine.module
    if not parameters_finite(model):
        raise RuntimeError(f"step {step}: parameters are not finite; checkpoint not written")
    rank = dist.rank()
    root = Path(out_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")

    def write_ranks_files() -> None:
        with _frozen_tied_weights_excluded(engine):
            engine.save_checkpoint(
                str(tmp / "ds"),
                tag="state",
                save_latest=False,
                exclude_frozen_parameters=bool(adapters),
            )
        write_atomic(tmp / f"rng_rank{rank}.json", json.dumps(rng_state()))
        if universal_from is not None and supported(engine, universal_from):
            save_universal(engine, universal_from, tmp)

    def write_whole_model() -> None:
        with full_parameters(engine):  # ZeRO-3 holds a slice of each parameter per rank
            if rank == 0 and adapters:
                _save_adapters(model, tmp / ADAPTERS, adapters)
            elif rank == 0:
                model.save_pretrained(tmp / "model", tokenizer)

    def complete() -> None:
        if rank != 0:
            return
        write_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        write_checksums(tmp)
        write_atomic(tmp / COMPLETE, f"{final.name}\n")  # last: only now does it count
        if is_complete(final):  # this step's state saved before (e.g. the one resumed from)
            shutil.rmtree(final)
        elif final.exists():  # a folder of that name the trainer did not write: kept
            set_aside(final, "not a checkpoint the trainer wrote, and its name was needed")
        tmp.rename(final)
        write_atomic(root / LATEST, final.name)

    def make_dir() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)

    # each stage ends with a vote of every rank (it doubles as the barrier between stages)
    for stage in (make_dir, write_ranks_files, write_whole_model, complete):
        _all_or_nothing(stage, tmp, final)
    dist.barrier()
    return final


def set_aside(ckpt: Path, why: str) -> Path:
    """Rename a checkpoint the trainer cannot use to ``<name>.aside`` (never deleted, never
    counted as a checkpoint again) and say so; returns the new path."""
    target, n = ckpt.with_name(ckpt.name + ASIDE), 1
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}{ASIDE}.{n}"), n + 1
    ckpt.rename(target)
    print(f"train.py: warning: moved {ckpt} aside to {target.name} ({why})", file=sys.stderr)
    return target


def _all_or_nothing(stage, tmp: Path, final: Path) -> None:
    """Run one stage of a save on every rank; if it failed anywhere (OSError: a full disk,
    permissions), remove the partial checkpoint and raise CheckpointWriteError on every rank,
    instead of leaving the other ranks waiting at the next barrier."""
    error = None
    try:
        stage()
    except OSError as err:
        error = err
    except RuntimeError as err:  # torch.save reports a failed write so; anything else is a bug
        if not any(sign in str(err) for sign in TORCH_SAVE_WRITE_ERRORS):
            raise
        error = err
    if dist.vote_max([int(error is not None)])[0]:
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"{error}" if error is not None else "on another rank"
        raise CheckpointWriteError(
            f"cannot write checkpoint {final} ({where}); the partial checkpoint was removed "
            f"and the previous ones are intact. Free disk space (or fix permissions) and run "
            "the same command to resume."
        )


@contextlib.contextmanager
def _frozen_tied_weights_excluded(engine):
    """DeepSpeed's ``exclude_frozen_parameters`` looks frozen weights up by their first name
    only, so a tied head (``lm_head.weight`` is ``transformer.wte.weight``) would be saved
    whole; drop every name of every frozen tensor."""
    original = engine.module_state_dict

    def state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class's method


def _save_adapters(model: torch.nn.Module, path: Path, info: dict) -> None:
    from safetensors.torch import save

    from gpt.lora import lora_state

    state = {k: v.detach().cpu().contiguous() for k, v in lora_state(model).items()}
    write_atomic(path / "adapters.safetensors", save(state))
    write_atomic(path / "adapter.json", json.dumps(info, indent=1) + "\n")


# DeepSpeed's own plain classes found in its optimizer states (ZeRO 1-3); nothing else that
# is not a tensor or a builtin container may be unpickled.
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list:
    import importlib

    found = []
    for module, name in _DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return found


def load_weights_only(f, map_location=None):
    """``torch.load`` that unpickles only tensors, builtins and the allow-list above; any
    other object is refused with CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise CheckpointError(
            f"{f}: refusing to load: it holds objects other than tensors and plain data "
            f"({first[:200]}); a checkpoint must never run code when loaded. Use a "
            "checkpoint written by this trainer, or delete this one to resume from an "
            "older checkpoint."
        ) from None


@contextlib.contextmanager
def weights_only_loads(engine):
    """Within it, every file ``engine`` (a DeepSpeedEngine) reads through its checkpoint
    engine, which asks for ``weights_only=False``, is read by ``load_weights_only`` instead.
    Scoped to this engine: ``torch.load`` itself, and every other caller of it, is left
    alone."""
    reader = engine.checkpoint_engine
    reader.load = load_weights_only  # an instance attribute: shadows the class's method
    try:
        yield
    finally:
        del reader.load  # back to the class's method


def read_trainer_state(ckpt: Path) -> dict:
    """``trainer.json`` of a checkpoint with its types checked; CheckpointError naming the
    file and key when it is damaged (the trainer then falls back to an older checkpoint)."""
    from gpt.config import ModelConfig

    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged: not a JSON object")
    types = {
        "step": int, "tokens": int, "loader": dict, "world_size": int, "config": dict,
        "data_fingerprint": (list, dict),
    }  # fmt: skip
    for key, tp in types.items():
        if key not in state:
            raise CheckpointError(f"{path}: damaged: missing {key}")
        if not isinstance(state[key], tp) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: damaged: {key} has the wrong type")
    if state["step"] < 0 or state["world_size"] < 1:
        raise CheckpointError(f"{path}: damaged: step or world_size out of range")
    model = state["config"].get("model")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(model, dict) or set(model) - fields:
        extra = sorted(set(model) - fields) if isinstance(model, dict) else "not an object"
        raise CheckpointError(f"{path}: damaged: config.model: unknown keys {extra}")
    if not isinstance(state["config"].get("train"), dict):
        raise CheckpointError(f"{path}: damaged: config.train missing")
    return state


def load_checkpoint(
    engine, ckpt: Path, universal_into: torch.optim.Optimizer | None = None
) -> dict:
    """Collective: restores engine (model, optimizer) and this rank's RNG; returns the
    trainer state saved with it. CheckpointError (on every rank alike) if it is damaged. A
    LoRA checkpoint restores the adapters; the frozen base is the model's own. With
    ``universal_into`` (the optimizer the engine was built with) the state comes from
    ``universal/``, for a run with another number of processes or ZeRO stage than the one
    that saved it (see ``check_resume``); else from DeepSpeed's own files."""
    verify_checksums(ckpt)
    trainer_state = read_trainer_state(ckpt)
    rng = read_rng_state(ckpt)
    if universal_into is not None:
        try:
            load_universal(engine, universal_into, ckpt)
        except UniversalStateError as err:
            raise CheckpointError(str(err)) from None
    else:
        strict = not (ckpt / ADAPTERS).is_dir()
        with weights_only_loads(engine):
            load_path, _ = engine.load_checkpoint(
                str(ckpt / "ds"), tag="state", load_module_strict=strict
            )
        if load_path is None:
            raise CheckpointError(f"{ckpt / 'ds'}: DeepSpeed could not load this checkpoint")
    if rng is not None:
        set_rng_state(rng)
    return trainer_state
