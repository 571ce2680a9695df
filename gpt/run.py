"""A run directory (``train.out_dir``) as tools see it: its files, its config, where it ran.

A run directory holds::

    out_dir/config.toml                   resolved config of the run
    out_dir/run.json                      working directory and command line of the latest start
    out_dir/metrics.jsonl                 one JSON object per logged step
    out_dir/LOCK                          held (flock) by the job that trains in out_dir
    out_dir/checkpoints/step_00000100/    one complete checkpoint (gpt/train/checkpoint.py
                                          writes it, gpt/store.py reads it back verified)
    out_dir/checkpoints/step_00000100.tmp a checkpoint being written (removed at the next
                                          start when a kill left it)
    out_dir/checkpoints/latest            name of the newest complete checkpoint

Relative paths of the config (``data.dir``, ...) are relative to the directory train.py
started in, which ``run.json`` records, so tools (``gpt.report``, ``sample.py``) resolve them
from anywhere.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt.config import Config
from gpt.config_io import load_config
from gpt.fileio import write_atomic
from gpt.store import CHECKPOINTS, NAME, complete_checkpoints

CONFIG = "config.toml"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"


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
        """data.dir, or with data.mixture its first source (the set tools default to)."""
        return next(iter(self.data_dirs.values()))

    @property
    def data_dirs(self) -> dict[str, Path]:
        """The sets the run trains on by name: data.mixture's sources, or data.dir ("train")
        alone (a replay set is not counted: it is general text, not the run's own data)."""
        d = self.config.data
        if d.mixture:
            return {name: self.resolve(d.sources.get(name, "")) for name in d.mixture}
        return {"train": self.resolve(d.dir)}


def read_run(run_dir: str | Path) -> Run:
    """A run directory's config, metrics file and checkpoints; ValueError naming the file
    when it is not a run directory."""
    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG
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
        metrics=run_dir / METRICS,
        checkpoints=complete_checkpoints(run_dir),
        cwd=cwd,
    )


def write_run_info(out_dir: Path, argv: list[str], **facts) -> None:
    """Record where and how the run was started (so tools resolve its relative paths), and
    ``facts`` such as its parameter counts."""
    info = {"cwd": str(Path.cwd()), "argv": argv, "python": sys.executable, **facts}
    write_atomic(out_dir / RUN_INFO, json.dumps(info, indent=1) + "\n")


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
