"""Checkpoint layout of a training run, and finding the model in a path.

A run directory holds::

    out_dir/config.toml                   resolved config of the run
    out_dir/metrics.jsonl                 one JSON object per logged step
    out_dir/checkpoints/step_00000100/    one complete checkpoint:
        ds/                               DeepSpeed's own (model, optimizer, scheduler)
        trainer.json                      step, tokens, data loader state, versions, config
        rng_rank{r}.json                  RNG states of python, numpy and torch per rank
        model/                            config.json + model.safetensors (GPT.from_pretrained)
        COMPLETE                          written last, after every rank finished
    out_dir/checkpoints/latest            name of the newest complete checkpoint

A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed once ``COMPLETE`` is in
it, so a kill at any moment leaves either the old checkpoints only or the new one whole.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gpt.fileio import write_atomic

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. ``latest`` is a hint: if it names
    a checkpoint that is missing or incomplete, the newest complete one is used instead."""
    root = Path(out_dir) / CHECKPOINTS
    hint = root / LATEST
    if hint.is_file():
        named = root / hint.read_text().strip()
        if (named / COMPLETE).is_file():
            return named
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory (config.json + model.safetensors) that ``path`` refers to: a model
    directory itself, one checkpoint, or a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / COMPLETE).is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return ckpt / "model"
    if (path / CHECKPOINTS).is_dir():
        raise FileNotFoundError(f"{path}: the run has no complete checkpoint yet")
    raise FileNotFoundError(
        f"{path}: not a model directory (config.json + model.safetensors), a checkpoint "
        f"({COMPLETE} + model/) or a run directory (checkpoints/)"
    )


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


def full_parameters(engine):
    """Collective: under ZeRO-3 a context in which every rank holds whole parameters."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parameters_finite(model: torch.nn.Module) -> bool:
    """True on every rank when no rank holds a NaN or infinite parameter."""
    # under ZeRO-3 a parameter is empty here and this rank's slice of it is p.ds_tensor
    local = [getattr(p, "ds_tensor", p) for p in model.parameters()]
    ok = torch.tensor([float(all(torch.isfinite(p).all() for p in local))])
    if dist.is_initialized() and dist.get_world_size() > 1:
        ok = ok.to(next(model.parameters()).device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.item() == 1.0


def save_checkpoint(
    engine,
    out_dir: str | Path,
    step: int,
    trainer_state: dict,
    keep: int,
    tokenizer: str | None = None,
) -> Path:
    """Collective: every rank calls it. Writes the checkpoint of ``step`` under a temporary
    name, marks it COMPLETE once every rank finished, renames it, points ``latest`` at it and
    deletes all but the newest ``keep``. Refuses (RuntimeError) non-finite parameters."""
    model = engine.module
    if not parameters_finite(model):
        raise RuntimeError(f"step {step}: parameters are not finite; checkpoint not written")
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(out_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    write_atomic(tmp / f"rng_rank{rank}.json", json.dumps(rng_state()))
    _barrier()
    with full_parameters(engine):  # ZeRO-3 holds a slice of each parameter per rank
        if rank == 0:
            model.save_pretrained(tmp / "model", tokenizer)
    if rank == 0:
        write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1))
        write_atomic(tmp / COMPLETE, f"{final.name}\n")  # last: only now does it count
        if final.exists():  # an older save of the same step
            shutil.rmtree(final)
        tmp.rename(final)
        write_atomic(root / LATEST, final.name)
        for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            doomed = old.with_name(old.name + ".tmp")  # incomplete from the first byte deleted
            old.rename(doomed)
            shutil.rmtree(doomed)
    _barrier()
    return final


def load_checkpoint(engine, ckpt: Path) -> dict:
    """Collective: restores engine (model, optimizer) and this rank's RNG; returns the
    trainer state saved with it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_state = json.loads((ckpt / "trainer.json").read_text())
    load_path, _ = engine.load_checkpoint(str(ckpt / "ds"), tag="state")
    if load_path is None:
        raise RuntimeError(f"{ckpt / 'ds'}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        set_rng_state(json.loads(rng_file.read_text()))
    return trainer_state
