"""gpt/run.py: a run directory as tools see it. Its relative paths resolve against the
directory recorded in run.json, a damaged record or a directory that is no run is a
ValueError naming the file, and only the trainer's partial checkpoints are removed."""

import json
import sys

import pytest

from gpt.run import read_run, remove_partial_checkpoints, write_run_info
from gpt.store import checkpoint_name


def make_run(path, data_dir="bytes"):
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[data]\ndir = "{data_dir}"\n')
    return path


def test_relative_paths_resolve_against_where_the_run_started(tmp_path, monkeypatch):
    run = make_run(tmp_path / "start" / "run")
    monkeypatch.chdir(tmp_path / "start")
    write_run_info(run, ["train.py", "x.toml"], params=12)
    info = json.loads((run / "run.json").read_text())
    assert info == {
        "cwd": str(tmp_path / "start"),
        "argv": ["train.py", "x.toml"],
        "python": sys.executable,
        "params": 12,
    }
    monkeypatch.chdir(tmp_path)  # a tool run from elsewhere
    found = read_run(run)
    assert found.data_dir == tmp_path / "start" / "bytes"
    assert found.resolve(str(tmp_path / "abs")) == tmp_path / "abs"
    assert found.metrics == run / "metrics.jsonl"
    assert found.checkpoints == []


def test_without_run_json_the_current_directory_is_used(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    assert read_run(run).data_dir == tmp_path / "run" / "bytes"


def test_complete_checkpoints_only_oldest_first(tmp_path):
    run = make_run(tmp_path / "run")
    for step in (20, 5):
        ckpt = run / "checkpoints" / checkpoint_name(step)
        ckpt.mkdir(parents=True)
        (ckpt / "COMPLETE").write_text(f"{ckpt.name}\n")
    (run / "checkpoints" / checkpoint_name(30)).mkdir()  # no COMPLETE: not one
    assert [p.name for p in read_run(run).checkpoints] == ["step_00000005", "step_00000020"]


@pytest.mark.parametrize("record", ["{", '{"argv": []}', "[1]"])
def test_a_damaged_run_json_is_named(tmp_path, record):
    run = make_run(tmp_path / "run")
    (run / "run.json").write_text(record)
    with pytest.raises(ValueError, match=rf"{run / 'run.json'}: damaged"):
        read_run(run)


def test_a_directory_without_config_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.toml'} does not exist"):
        read_run(tmp_path)


def test_only_partial_checkpoints_of_the_trainer_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    partial = root / "step_00000010.tmp"
    (partial / "ds").mkdir(parents=True)
    kept = [root / "step_00000005", root / "notes.tmp", root / "step_10.tmp"]
    for path in kept:
        path.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "step_00000020.tmp").symlink_to(tmp_path / "elsewhere")  # a link: never followed
    assert remove_partial_checkpoints(tmp_path) == [partial]
    assert not partial.exists()
    assert all(path.exists() for path in kept)
    assert (tmp_path / "elsewhere").is_dir() and (root / "step_00000020.tmp").is_symlink()
    assert remove_partial_checkpoints(tmp_path / "no-run") == []
