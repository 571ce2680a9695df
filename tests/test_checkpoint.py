"""gpt/train/checkpoint.py: the files of a checkpoint checked for their types before they are
trusted, writes that fail, old tables, loading scoped to one engine. (Pruning, setting aside
and the resume policy: test_checkpointer.py.)"""

import json

import pytest
from runs import names

from gpt.cli import train
from gpt.store import latest_checkpoint, verify_checksums
from gpt.train import checkpoint as ckpt


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(step="20"),
        lambda s: s.update(world_size=True),
        lambda s: s["config"]["model"].update(n_experts=4),  # an extra model key
        lambda s: s.pop("loader"),
        lambda s: s.update(config=[]),
    ],
)
def test_a_trainer_state_of_the_wrong_shape_falls_back_to_an_older_checkpoint(
    trained, capsys, damage
):
    path, out = trained
    newest = out / "checkpoints" / "step_00000020"
    state = json.loads((newest / "trainer.json").read_text())
    damage(state)
    (newest / "trainer.json").write_text(json.dumps(state))
    ckpt.write_checksums(newest)  # consistent checksums: the content itself is checked
    assert train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"]) == 0
    captured = capsys.readouterr()
    assert f"{newest / 'trainer.json'}: damaged" in captured.err
    assert f"resuming from {out / 'checkpoints' / 'step_00000010'}" in captured.out
    assert "step_00000020.aside" in names(out)
    assert latest_checkpoint(out).name == "step_00000021"


@pytest.mark.parametrize(
    "rng", ['{"python": [3, [1, 2], null], "numpy": 5, "torch": "x"}', "[]", '{"python": 1}']
)
def test_an_rng_state_of_the_wrong_shape_falls_back(trained, capsys, rng):
    path, out = trained
    newest = out / "checkpoints" / "step_00000020"
    (newest / "rng_rank0.json").write_text(rng)
    ckpt.write_checksums(newest)
    assert train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"]) == 0
    assert f"{newest / 'rng_rank0.json'}: damaged" in capsys.readouterr().err


def test_a_full_disk_reported_by_torch_save_as_runtime_error_is_status_4(
    trained, monkeypatch, capsys
):
    from gpt.train.trainer import CHECKPOINT_WRITE_EXIT

    path, out = trained

    def full(root):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64")

    monkeypatch.setattr(ckpt, "write_checksums", full)
    args = [str(path), "--train.max_steps=21", "--train.eval_interval=0"]
    assert train.main(args) == CHECKPOINT_WRITE_EXIT
    assert "cannot write checkpoint" in capsys.readouterr().err
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_checkpoint_whose_table_predates_listed_sidecars_still_resumes_and_loads(trained, capsys):
    """Tables written before this version left model/checksums.json out (the weights it
    covers are listed): such checkpoints are not damaged."""
    from gpt.store import load_model

    path, out = trained
    newest = out / "checkpoints" / "step_00000020"
    table = json.loads((newest / "checksums.json").read_text())
    del table["model/checksums.json"]
    (newest / "checksums.json").write_text(json.dumps(table))
    verify_checksums(newest)
    load_model(out)
    assert train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"]) == 0
    assert f"resuming from {newest}" in capsys.readouterr().out


def test_a_runtime_error_that_is_not_a_failed_write_is_not_called_one(trained, monkeypatch):
    path, _ = trained

    def bug(root):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(ckpt, "write_checksums", bug)
    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"])


def test_weights_only_loads_is_scoped_to_one_engine(tmp_path):
    """Within it, what the engine's checkpoint reader loads unpickles only tensors and plain
    data; torch.load itself, and every other reader, is left as it is, and the engine's
    reader is its own again afterwards."""
    import argparse
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"x": torch.ones(2), "step": 3}, good)
    torch.save({"x": torch.ones(2), "args": argparse.Namespace(a=1)}, bad)  # an object
    engine, other = (
        SimpleNamespace(checkpoint_engine=TorchCheckpointEngine()),
        TorchCheckpointEngine(),
    )
    real_load = torch.load
    with ckpt.weights_only_loads(engine):
        assert torch.load is real_load
        with pytest.raises(ckpt.CheckpointError, match=rf"{bad}: refusing to load"):
            engine.checkpoint_engine.load(str(bad), map_location="cpu")
        assert engine.checkpoint_engine.load(str(good))["step"] == 3
        assert other.load(str(bad))["args"].a == 1  # another engine's reader: untouched
    assert engine.checkpoint_engine.load(str(bad))["args"].a == 1  # its own reader again
