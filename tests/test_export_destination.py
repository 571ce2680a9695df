"""Where ``python -m gpt.convert`` writes (gpt/convert/destination.py): never into a run
directory or a checkpoint, never over its source or a directory that is not an earlier
export; an earlier export is overwritten. Each refusal is status 2 and one line naming the
destination, and leaves everything as it was."""

import json
import shutil

import pytest
import torch
from runs import config

from gpt import GPT, ModelConfig
from gpt.cli import train
from gpt.convert.__main__ import main as convert_main
from gpt.fileio import sha256_file
from gpt.store import latest_checkpoint, load_model

SMALL = dict(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A 5-step run with one checkpoint (trained once)."""
    path, out = config(tmp_path_factory.mktemp("finished"), data_dir)
    assert train.main([str(path), "--train.max_steps=5", "--train.eval_interval=0"]) == 0
    return out


@pytest.fixture
def run(tmp_path, finished):
    """A copy of the finished run for one test to write into."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def refused(capsys, src, out, *words) -> str:
    """Status 2 and one line on stderr naming ``out`` and each of ``words``."""
    assert convert_main([str(src), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("python -m gpt.convert: error: "), err
    for word in (str(out), "valid: a new or empty directory", *words):
        assert word in err, f"{word!r} not in {err!r}"
    return err


def test_a_checkpoint_is_never_written_into(run, capsys):
    ckpt = latest_checkpoint(run)
    before = snapshot(run)
    for out in (ckpt / "model", ckpt, ckpt / "model" / "new"):
        refused(capsys, run, out, f"inside the checkpoint {ckpt.resolve()}", "COMPLETE")
    assert snapshot(run) == before


def test_a_run_directory_is_never_written_into(run, tmp_path, capsys):
    GPT(ModelConfig(**SMALL)).save_pretrained(tmp_path / "model")
    before = snapshot(run)
    for out in (run, run / "export", run / "checkpoints"):
        refused(capsys, tmp_path / "model", out, "run directory", "newest checkpoint")
    assert snapshot(run) == before
    # a run that has not saved a checkpoint yet holds config.toml and run.json (and LOCK)
    young = tmp_path / "young"
    young.mkdir()
    (young / "config.toml").write_text("[model]\n")
    (young / "run.json").write_text("{}")
    refused(capsys, run, young / "export", f"run directory {young.resolve()}", "config.toml")
    assert sorted(p.name for p in young.iterdir()) == ["config.toml", "run.json"]
    # a project folder with some tool's config.toml is not a run directory
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.toml").write_text("[tool]\n")
    assert convert_main([str(tmp_path / "model"), str(project / "export")]) == 0


def test_the_source_is_never_written_over(tmp_path, capsys):
    GPT(ModelConfig(**SMALL)).save_pretrained(tmp_path / "src", tokenizer="bytes")
    before = snapshot(tmp_path / "src")
    refused(capsys, tmp_path / "src", tmp_path / "src", f"is the source {tmp_path / 'src'}")
    refused(capsys, tmp_path / "src", tmp_path / "src" / "sub", "is inside the source")
    assert snapshot(tmp_path / "src") == before


def test_files_and_foreign_directories_are_never_written_over(tmp_path, capsys):
    GPT(ModelConfig(**SMALL)).save_pretrained(tmp_path / "src")
    (tmp_path / "notes.txt").write_text("mine")
    refused(capsys, tmp_path / "src", tmp_path / "notes.txt", "is a file")
    refused(capsys, tmp_path / "src", tmp_path / "notes.txt" / "out", "lies under the file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(capsys, tmp_path / "src", foreign, "not an earlier export", "notes.txt")
    # an export with a file no export writes is someone else's directory now
    GPT(ModelConfig(**SMALL)).save_pretrained(tmp_path / "added")
    (tmp_path / "added" / "README.md").write_text("mine")
    refused(capsys, tmp_path / "src", tmp_path / "added", "README.md")
    assert (foreign / "notes.txt").read_text() == (tmp_path / "notes.txt").read_text() == "mine"


def test_an_earlier_export_or_an_empty_directory_is_written(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert convert_main([str(run), str(tmp_path / "empty")]) == 0
    torch.manual_seed(3)
    GPT(ModelConfig(**SMALL)).save_pretrained(tmp_path / "other", tokenizer="bytes")
    assert convert_main([str(tmp_path / "other"), str(tmp_path / "export")]) == 0
    (tmp_path / "export" / "model.safetensors.tmp").write_bytes(b"left by a killed export")
    # overwriting an earlier export: the run's weights replace the other model's
    assert convert_main([str(run), str(tmp_path / "export")]) == 0
    assert "wrote" in capsys.readouterr().out
    want = load_model(run).state_dict()
    got = load_model(tmp_path / "export").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["gpt_config"]["attention"] == "sdpa"  # the run's, not the exporter's
