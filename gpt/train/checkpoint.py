"""The layout of a run directory, saving and loading checkpoints, and the resume policy.

This is the one module that knows the layout. A run directory holds::

    out_dir/config.toml                   resolved config of the run
    out_dir/run.json                      working directory and command line of the latest start
    out_dir/metrics.jsonl                 one JSON object per logged step
    out_dir/LOCK                          held (flock) by the job that trains in out_dir
    out_dir/checkpoints/step_00000100/    one complete checkpoint:
        ds/                               DeepSpeed's own (model, optimizer, scheduler)
        trainer.json                      step, tokens, data loader state, versions, config
        universal/                        the same training state whole, per parameter, for
                                          any number of processes (gpt/train/universal.py)
        rng_rank{r}.json                  RNG states of python, numpy and torch per rank
        model/                            config.json + model.safetensors (GPT.from_pretrained)
        adapters/                         instead of model/ in a LoRA run: the adapters only,
                                          and which base they adapt (load_model merges them)
        checksums.json                    sha256 of every file above
        COMPLETE                          written last, after every rank finished
    out_dir/checkpoints/latest            name of the newest complete checkpoint

A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed once ``COMPLETE`` is in
it, so a kill at any moment leaves either the old checkpoints only or the new one whole.
Loading never unpickles code: DeepSpeed's ``.pt`` files are read with
``torch.load(weights_only=True)`` and a short allow-list of DeepSpeed's own plain classes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import pickle
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.config import Config, ConfigError, load_config
from gpt.fileio import write_atomic
from gpt.store import (
    ADAPTERS,
    CHECKPOINTS,
    COMPLETE,
    LATEST,
    NAME,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    complete_checkpoints,
    is_complete,
    pinned_checkpoints,
    verify_checksums,
    write_checksums,
)
from gpt.train import dist
from gpt.train.universal import (
    UniversalStateError,
    has_universal,
    load_universal,
    save_universal,
    supported,
)

TRAINER_STATE = "trainer.json"
RUN_INFO = "run.json"
ASIDE = ".aside"  # suffix of a checkpoint the trainer found damaged and set aside
# how torch.save's C++ writer reports a full disk or a failed write (a RuntimeError)
TORCH_SAVE_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "file write failed")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, permissions); the partial one was
    removed and the previous checkpoints are intact."""


def remove_partial_checkpoints(out_dir: str | Path) -> list[Path]:
    """Delete ``*.tmp`` checkpoint directories left by a run killed while saving (they are
    never read); returns what was removed. Call on one rank, before training starts."""
    root = Path(out_dir) / CHECKPOINTS
    doomed = sorted(
        p for p in root.glob("step_*.tmp") if NAME.fullmatch(p.stem) and not p.is_symlink()
    )
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------
# A run directory as a whole (for tools: report, sample)
# ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a tool needs to know about a run directory."""

    dir: Path
    config: Config
    metrics: Path
    checkpoints: list[Path]
    cwd: Path  # the directory relative paths of the config are relative to

    def resolve(self, path: str) -> Path:
        """A path of the run's config, made absolute against the run's working directory."""
        return Path(path) if Path(path).is_absolute() else self.cwd / path

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.config.data.dir)


def read_run(run_dir: str | Path) -> Run:
    """A run directory's config, metrics file and checkpoints; ValueError naming the file
    when it is not a run directory."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist: is {run_dir} a train.out_dir?")
    info_file = run_dir / RUN_INFO
    cwd = Path.cwd()
    if info_file.is_file():
        try:
            cwd = Path(json.loads(info_file.read_text())["cwd"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{info_file}: damaged ({err}); delete it to use the current "
                "directory for the run's relative paths"
            ) from None
    return Run(
        dir=run_dir,
        config=load_config(config_file),
        metrics=run_dir / "metrics.jsonl",
        checkpoints=complete_checkpoints(run_dir),
        cwd=cwd,
    )


def write_run_info(out_dir: Path, argv: list[str], **facts) -> None:
    """Record where and how the run was started (so tools resolve its relative paths), and
    ``facts`` such as its parameter counts."""
    info = {"cwd": str(Path.cwd()), "argv": argv, "python": sys.executable, **facts}
    write_atomic(out_dir / RUN_INFO, json.dumps(info, indent=1) + "\n")


# ------------------------------------------------------------------------------------------
# RNG state (JSON, never pickle)
# ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, numpy and torch (CPU and current CUDA device) RNG states, as JSON: no pickle."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(
        torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8)
    )
    if "cuda" in state and torch.cuda.is_available():
        raw = bytearray(base64.b64decode(state["cuda"]))
        torch.cuda.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------


def full_parameters(engine):
    """Collective: under ZeRO-3 a context in which every rank holds whole parameters."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


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


def prune_checkpoints(out_dir: str | Path, keep: int, good: list[Path]) -> list[Path]:
    """Rank 0: delete the checkpoints older than the ``keep`` newest of ``good`` (those this
    process wrote or resumed from, verified then); 0 keeps everything. Only complete
    checkpoints whose checksum table still lists exactly the files present are deleted (their
    contents are not hashed again: they are going), one that fails is set aside instead, and
    nothing newer than the oldest kept one, nothing a LoRA run pinned as its base
    (``store.pinned_checkpoints``), nor anything the trainer did not write (see
    ``is_complete``) is touched. A deletion that fails is a warning, never an error: the
    other ranks are already training on. Returns what was deleted."""
    kept = sorted(good, key=checkpoint_step)[-keep:] if keep > 0 else []
    if not kept:
        return []
    oldest_kept = checkpoint_step(kept[0])
    pinned = pinned_checkpoints(out_dir)
    deleted = []
    for old in complete_checkpoints(out_dir):
        if checkpoint_step(old) >= oldest_kept:
            break
        if old.name in pinned:  # the base of a LoRA run's adapters
            continue
        try:
            try:
                verify_checksums(old, only="")  # the table and the files present agree
            except CheckpointError as err:
                set_aside(old, f"damaged, so not pruned: {err}")
                continue
            doomed = old.with_name(old.name + ".tmp")  # incomplete from the first byte deleted
            old.rename(doomed)
            shutil.rmtree(doomed)
            deleted.append(old)
        except OSError as err:
            print(f"train.py: warning: could not prune {old}: {err}", file=sys.stderr)
    return deleted


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


@contextlib.contextmanager
def weights_only_loads():
    """Within it, every ``torch.load`` (DeepSpeed's included, which asks for
    ``weights_only=False``) unpickles only tensors, builtins and the allow-list above; any
    other object is refused with CheckpointError naming the file."""
    real_load = torch.load
    allowed = _safe_globals()

    def safe_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise CheckpointError(
                f"{f}: refusing to load: it holds objects other than tensors and plain data "
                f"({first[:200]}); a checkpoint must never run code when loaded. Use a "
                "checkpoint written by this trainer, or delete this one to resume from an "
                "older checkpoint."
            ) from None

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = real_load


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


def read_rng_state(ckpt: Path) -> dict | None:
    """This rank's ``rng_rank{r}.json`` with its shape checked (None when absent: resuming
    on more ranks than were saved); CheckpointError naming the file when damaged."""
    path = ckpt / f"rng_rank{dist.rank()}.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        ok = (
            isinstance(version, int) and isinstance(internal, list) and len(internal) == 625
            and all(isinstance(v, int) for v in internal) and isinstance(kind, str)
            and isinstance(keys, list) and len(keys) == 624 and isinstance(pos, int)
            and isinstance(state["torch"], str)
            and (gauss is None or isinstance(gauss, float))
            and isinstance(has_gauss, int) and isinstance(cached, float)
        )  # fmt: skip
        base64.b64decode(state["torch"], validate=True)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: damaged: not the random-number state this trainer writes")
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
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(
                str(ckpt / "ds"), tag="state", load_module_strict=strict
            )
        if load_path is None:
            raise CheckpointError(f"{ckpt / 'ds'}: DeepSpeed could not load this checkpoint")
    if rng is not None:
        set_rng_state(rng)
    return trainer_state


# ------------------------------------------------------------------------------------------
# Resume policy
# ------------------------------------------------------------------------------------------


TRAINED_ON = ("train", "replay")  # the data sets whose tokens training consumes, by role


def data_fingerprint(manifests: dict[str, dict]) -> dict[str, list]:
    """What identifies the data a run trains on: per role (data.dir's "train", and the
    replay set's when there is one) its shard files and their CRCs. Validation sets are
    left out: adding one to a run is allowed."""
    return {
        role: sorted(
            [s["file"], s["crc32"]] for split in m["splits"].values() for s in split["shards"]
        )
        for role, m in manifests.items()
        if role in TRAINED_ON
    }


def check_resume(
    cfg: Config, saved: dict, manifests: dict[str, dict], world: int, ckpt: Path
) -> bool:
    """Refuse (ConfigError), before the first step, to resume what would not continue the
    same run: another model shape or another data set. Returns whether the checkpoint must be
    loaded through its universal state (``needs_universal``)."""
    changed = [
        f"model.{k}: {v!r} -> {getattr(cfg.model, k)!r}"
        for k, v in saved["config"]["model"].items()
        if k not in ("attention", "dropout") and getattr(cfg.model, k) != v
    ]
    if changed:
        raise ConfigError(
            f"{ckpt}: cannot resume with a different model shape: {'; '.join(changed)}"
        )
    then, now = saved["data_fingerprint"], data_fingerprint(manifests)
    if isinstance(then, list):  # written before roles: data.dir's shards only
        then = {"train": then, **({"replay": now["replay"]} if "replay" in now else {})}
    for role in sorted(set(then) | set(now)):
        if then.get(role) != now.get(role):
            key, value = (
                ("data.dir", cfg.data.dir)
                if role == "train"
                else ("finetune.replay_dir", cfg.finetune.replay_dir)
            )
            raise ConfigError(
                f"{ckpt}: cannot resume: the data set changed ({key} = {value!r} now holds "
                "different shards than when the checkpoint was written, or none)"
            )
    return needs_universal(cfg, saved, world, ckpt)


def needs_universal(cfg: Config, saved: dict, world: int, ckpt: Path) -> bool:
    """Whether ``ckpt`` must be loaded through its universal state: when the layout of the
    training state (number of processes, ZeRO stage, dtype) changed, unless DeepSpeed's own
    files hold it whole (ZeRO stage 0 on both sides, same dtype). ConfigError when neither
    can be loaded into this run."""
    then = (saved["world_size"], zero_stage_of(saved), saved["config"]["train"]["dtype"])
    now = (world, cfg.zero_stage, cfg.train.dtype)
    if then == now or (then[1] == now[1] == 0 and then[2] == now[2]):
        return False
    # DeepSpeed wraps our optimizer in stage 0 with fp16/bf16: its state is not per parameter
    if has_universal(ckpt) and (cfg.zero_stage > 0 or cfg.train.dtype == "fp32"):
        return True
    layout = "{} process(es), ZeRO stage {}, dtype {}"
    why = (
        "it has no universal/ state (saved with train.universal_checkpoint = false, or by an "
        "older version)"
        if not has_universal(ckpt)
        else "its universal/ state loads into ZeRO stage 1-3, or stage 0 with fp32"
    )
    raise ConfigError(
        f"{ckpt}: saved by {layout.format(*then)}, resumed by {layout.format(*now)}: {why}; "
        f"resume with {then[0]} process(es), deepspeed.zero_optimization.stage = {then[1]} "
        f"and train.dtype = {then[2]!r}"
    )


def zero_stage_of(trainer_state: dict) -> int:
    """The ZeRO stage a checkpoint was saved with (from its trainer.json)."""
    return trainer_state["config"].get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
