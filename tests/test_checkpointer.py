"""gpt/train/checkpointer.py: when to save, the pruning rule, checkpoints set aside, resuming
past damaged ones, and the resume policy (model shape, data set by role)."""

import json
import shutil

import pytest
from runs import flip_byte, names

from gpt.cli import train
from gpt.config import Config, ConfigError, TrainConfig
from gpt.config_io import load_config
from gpt.store import complete_checkpoints, latest_checkpoint, verify_checksums
from gpt.train.checkpointer import Checkpointer, check_resume, data_fingerprint


@pytest.mark.parametrize(
    ("interval", "max_steps", "due"),
    [(10, 25, [10, 20, 25]), (1, 3, [1, 2, 3]), (7, 7, [7]), (30, 25, [25])],
)
def test_a_checkpoint_is_due_every_interval_and_at_the_last_step(interval, max_steps, due):
    cfg = Config(train=TrainConfig(ckpt_interval=interval, max_steps=max_steps))
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.cfg = cfg
    assert [s for s in range(1, max_steps + 1) if checkpointer.due(s)] == due


def test_a_changed_model_shape_is_refused_and_the_backend_may_change(tmp_path):
    cfg = load_config(None, ["--model.n_layer=3", "--model.attention=naive"])
    saved_model = {**vars(cfg.model), "n_layer": 2, "attention": "sdpa", "dropout": 0.5}
    saved = {"config": {"model": saved_model, "train": {"dtype": cfg.train.dtype}}}
    with pytest.raises(ConfigError, match=r"different model shape: model.n_layer: 2 -> 3$"):
        check_resume(cfg, saved, {}, 1, tmp_path)
    saved_model["n_layer"] = 3
    saved.update(world_size=1, data_fingerprint={})
    assert check_resume(cfg, saved, {}, 1, tmp_path) is False


def test_pruning_never_deletes_the_only_good_checkpoints(trained, capsys):
    """The reported loss: a damaged newest checkpoint, then a run with keep_checkpoints=1.
    The damaged one is set aside (not counted, not deleted), the good ones this run writes
    are kept, and `latest` names one that exists."""
    path, out = trained
    flip_byte(out / "checkpoints" / "step_00000020" / "rng_rank0.json")
    args = [str(path), "--train.max_steps=14", "--train.ckpt_interval=1"]
    args += ["--train.keep_checkpoints=1", "--train.eval_interval=0"]
    assert train.main(args) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "rng_rank0.json: checksum mismatch" in err
    assert "moved" in err and "step_00000020.aside" in err
    assert names(out) == ["latest", "step_00000014", "step_00000020.aside"]
    assert latest_checkpoint(out).name == "step_00000014"
    verify_checksums(out / "checkpoints" / "step_00000014")
    args[1] = "--train.max_steps=16"
    assert train.main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert names(out) == ["latest", "step_00000016", "step_00000020.aside"]


def test_pruning_touches_nothing_the_trainer_did_not_write(trained):
    path, out = trained
    root = out / "checkpoints"
    (root / "step_backup").mkdir()  # a user's folder matching step_*
    (root / "step_backup" / "notes.txt").write_text("mine")
    fake = root / "step_00000003"  # a copy of a checkpoint under another name
    shutil.copytree(root / "step_00000010", fake)
    args = [str(path), "--train.max_steps=22", "--train.ckpt_interval=1"]
    assert train.main([*args, "--train.keep_checkpoints=1", "--train.eval_interval=0"]) == 0
    assert names(out) == ["latest", "step_00000003", "step_00000022", "step_backup"]
    assert (root / "step_backup" / "notes.txt").read_text() == "mine"


def test_an_old_checkpoint_holding_files_the_trainer_did_not_write_is_set_aside(trained, capsys):
    """Pruning checks that an old checkpoint's table lists exactly its files (its contents
    are not hashed again: it is going): one holding a file of someone else's is kept aside."""
    path, out = trained
    (out / "checkpoints" / "step_00000010" / "notes.txt").write_text("mine")
    args = [str(path), "--train.max_steps=21", "--train.keep_checkpoints=1"]
    assert train.main([*args, "--train.eval_interval=0"]) == 0
    assert names(out) == ["latest", "step_00000010.aside", "step_00000021"]
    assert (out / "checkpoints" / "step_00000010.aside" / "notes.txt").read_text() == "mine"
    assert "notes.txt: not listed" in capsys.readouterr().err


def test_a_same_named_folder_the_trainer_did_not_write_is_kept(trained):
    """Saving step 22 where a folder step_00000022 without the trainer's COMPLETE exists."""
    path, out = trained
    stray = out / "checkpoints" / "step_00000022"
    stray.mkdir()
    (stray / "data.bin").write_bytes(b"precious")
    assert train.main([str(path), "--train.max_steps=22", "--train.eval_interval=0"]) == 0
    assert (out / "checkpoints" / "step_00000022.aside" / "data.bin").read_bytes() == b"precious"
    assert latest_checkpoint(out).name == "step_00000022"


def test_the_fingerprint_covers_every_set_training_reads(tmp_path, data_dir):
    from gpt.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    other = json.loads(json.dumps(manifest))
    other["splits"]["train"]["shards"][0]["crc32"] = "00000000"
    cfg = load_config(None, [f"--data.dir={data_dir}", "--finetune.replay_dir=r"])
    saved = {
        "config": {"model": {}, "train": {"dtype": cfg.train.dtype}},
        "world_size": 1,
        "data_fingerprint": data_fingerprint({"train": manifest, "replay": manifest}),
    }
    assert set(saved["data_fingerprint"]) == {"train", "replay"}
    check_resume(cfg, saved, {"train": manifest, "replay": manifest, "law": other}, 1, tmp_path)
    with pytest.raises(ConfigError, match=r"data set changed \(finetune.replay_dir = 'r'"):
        check_resume(cfg, saved, {"train": manifest, "replay": other}, 1, tmp_path)
    with pytest.raises(ConfigError, match=r"data set changed \(data.dir"):
        check_resume(cfg, saved, {"train": other, "replay": manifest}, 1, tmp_path)
    legacy = {**saved, "data_fingerprint": data_fingerprint({"train": manifest})["train"]}
    check_resume(cfg, legacy, {"train": manifest, "replay": other}, 1, tmp_path)


def test_a_run_already_at_max_steps_says_what_to_set(trained, capsys):
    path, out = trained
    assert train.main([str(path), "--train.max_steps=20", "--train.eval_interval=0"]) == 0
    err = capsys.readouterr().err
    assert "is already at step 20, at train.max_steps = 20: nothing to train" in err
    assert "--train.max_steps=40" in err
    assert train.main([str(path), "--train.max_steps=12", "--train.eval_interval=0"]) == 0
    assert "already at step 20, past train.max_steps = 12" in capsys.readouterr().err
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000010", "step_00000020"]


def test_latest_names_the_checkpoint_resumed_from_once_the_damaged_one_is_aside(trained, capsys):
    path, out = trained
    flip_byte(out / "checkpoints" / "step_00000020" / "trainer.json", offset=-5)
    assert train.main([str(path), "--train.max_steps=10", "--train.eval_interval=0"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"
    assert names(out) == ["latest", "step_00000010", "step_00000020.aside"]


def test_a_linked_checkpoint_is_not_one_of_this_run(trained, tmp_path):
    """A symbolic link under checkpoints/ (to another run's checkpoint) is never resumed
    from, pruned or removed: the trainer did not write it."""
    path, out = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    link = out / "checkpoints" / "step_00000030"
    link.symlink_to(other / "checkpoints" / "step_00000020")
    tmp_link = out / "checkpoints" / "step_00000031.tmp"
    tmp_link.symlink_to(other / "checkpoints" / "step_00000010")
    args = [str(path), "--train.max_steps=23", "--train.ckpt_interval=1"]
    assert train.main([*args, "--train.keep_checkpoints=1", "--train.eval_interval=0"]) == 0
    assert link.is_symlink() and tmp_link.is_symlink()
    assert names(out) == ["latest", "step_00000023", "step_00000030", "step_00000031.tmp"]
    assert latest_checkpoint(out).name == "step_00000023"
    assert len(complete_checkpoints(other)) == 2  # the link's targets untouched
