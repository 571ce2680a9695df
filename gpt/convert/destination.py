"""Where ``python -m gpt.convert`` may write: never over what training or the source own.

A directory holding ``config.json`` is a model directory to every tool before it is a run
or a checkpoint, so an export dropped into a run directory would be read instead of the
run's newest checkpoint from then on, and one written into a checkpoint's ``model/`` would
replace the weights the checkpoint stands for. A destination is therefore refused when it is

- inside a checkpoint: it, or a folder above it, holds ``COMPLETE``;
- inside a run directory: it, or a folder above it, holds ``checkpoints/``, or both
  ``config.toml`` and ``run.json`` (what train.py writes; gpt/store.py has the layout);
- the source or inside it (the model directory given, and the one the weights come from: a
  LoRA checkpoint's base);
- a file, or a non-empty directory that is not an earlier export: ``config.json`` +
  ``model.safetensors`` + ``checksums.json`` and no file an export does not write.

Overwriting an earlier export is allowed: that is how an export is refreshed.
"""

from __future__ import annotations

from pathlib import Path

from gpt.convert import CHECKSUMS, CONFIG, EXPORT_FILES, WEIGHTS
from gpt.store import CHECKPOINTS, COMPLETE


def _run_markers(folder: Path) -> list[str]:
    """What marks ``folder`` as a train.out_dir: its checkpoints folder, or the config and
    run record train.py writes at every start (a lone config.toml may be anyone's)."""
    if (folder / CHECKPOINTS).is_dir():
        return [f"{CHECKPOINTS}/"]
    both = ["config.toml", "run.json"]
    return both if all((folder / name).is_file() for name in both) else []


VALID = (
    "valid: a new or empty directory, or an earlier export (config.json + model.safetensors + "
    "checksums.json), outside every run directory, checkpoint and the source"
)


def _is_earlier_export(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    # NAME.tmp: left by write_atomic when an earlier export was killed mid-write
    allowed = {*EXPORT_FILES, *(name + ".tmp" for name in EXPORT_FILES)}
    return {CONFIG, WEIGHTS, CHECKSUMS} <= names and all(
        p.name in allowed and p.is_file() for p in path.iterdir()
    )


def check_destination(out: str | Path, sources: list[str | Path]) -> None:
    """ValueError, one line naming ``out`` and saying what is valid, when an export must not
    be written to ``out``; ``sources`` are the paths the model is read from."""
    given, out = Path(out), Path(out).resolve()
    for folder in (out, *out.parents):
        if (folder / COMPLETE).is_file():
            raise ValueError(
                f"{given} is inside the checkpoint {folder} (it holds {COMPLETE}): the export "
                f"would replace files the checkpoint stands for; {VALID}"
            )
        found = _run_markers(folder)
        if found:
            raise ValueError(
                f"{given} is inside the run directory {folder} (it holds "
                f"{' and '.join(found)}): every tool would read the export instead of the "
                f"run's newest checkpoint; {VALID}"
            )
    for source in sources:
        source = Path(source).resolve()
        if out == source or source in out.parents:
            where = "is" if out == source else "is inside"
            raise ValueError(f"{given} {where} the source {source}; {VALID}")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"lies under the file {existing}"
        raise ValueError(f"{given} {what}; {VALID}")
    if out.is_dir() and any(out.iterdir()) and not _is_earlier_export(out):
        held = sorted(p.name for p in out.iterdir())
        more = f", ... ({len(held)} entries)" if len(held) > 3 else ""
        raise ValueError(
            f"{given} is a non-empty directory that is not an earlier export (it holds "
            f"{', '.join(held[:3])}{more}); {VALID}"
        )
