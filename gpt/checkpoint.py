"""Checkpoint layout of a training run, and finding the model in a path.

A run directory holds::

    out_dir/config.toml                   resolved config of the run
    out_dir/metrics.jsonl                 one JSON object per logged step
    out_dir/checkpoints/step_00000100/    one complete checkpoint:
        ds/                               DeepSpeed's own (model, optimizer, scheduler)
        trainer.json                      step, tokens, data loader state, versions, config
        rng_rank{r}.safetensors           RNG states of python, numpy and torch per rank
        model/                            config.json + model.safetensors (GPT.from_pretrained)
        COMPLETE                          written last, after every rank finished
    out_dir/checkpoints/latest            name of the newest complete checkpoint

A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed once ``COMPLETE`` is in
it, so a kill at any moment leaves either the old checkpoints only or the new one whole.
"""

from __future__ import annotations

from pathlib import Path

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
