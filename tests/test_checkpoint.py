"""gpt/train/checkpoint.py: the pruning rule, checkpoints set aside, the files of a checkpoint
checked for their types before they are trusted, the data fingerprint by role."""

import json
import shutil

import pytest
from runs import config

from gpt.cli import train
from gpt.config import ConfigError, load_config
from gpt.store import complete_checkpoints, latest_checkpoint, verify_checksums
from gpt.train import checkpoint as ckpt
from gpt.train.universal import UniversalStateError, read_index


def flip_byte(path, offset=-3):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def twenty(tmp_path_factory, data_dir):
    """A 20-step run with checkpoints at 10 and 20 (trained once)."""
    path, out = config(tmp_path_factory.mktemp("twenty"), data_dir)
    args = [
        str(path),
        "--train.max_steps=20",
        "--train.ckpt_interval=10",
        "--train.eval_interval=0",
    ]
    assert train.main(args) == 0
    return out


@pytest.fixture
def run(tmp_path, data_dir, twenty):
    path, out = config(tmp_path, data_dir)
    shutil.copytree(twenty, out)
    return path, out


def test_pruning_never_deletes_the_only_good_checkpoints(run, capsys):
    """The reported loss: a damaged newest checkpoint, then a run with keep_checkpoints=1.
    The damaged one is set aside (not counted, not deleted), the good ones this run writes
    are kept, and `latest` names one that exists."""
    path, out = run
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


def test_pruning_touches_nothing_the_trainer_did_not_write(run):
    path, out = run
    root = out / "checkpoints"
    (root / "step_backup").mkdir()  # a user's folder matching step_*
    (root / "step_backup" / "notes.txt").write_text("mine")
    fake = root / "step_00000003"  # a copy of a checkpoint under another name
    shutil.copytree(root / "step_00000010", fake)
    args = [str(path), "--train.max_steps=22", "--train.ckpt_interval=1"]
    assert train.main([*args, "--train.keep_checkpoints=1", "--train.eval_interval=0"]) == 0
    assert names(out) == ["latest", "step_00000003", "step_00000022", "step_backup"]
    assert (root / "step_backup" / "notes.txt").read_text() == "mine"


def test_an_old_checkpoint_holding_files_the_trainer_did_not_write_is_set_aside(run, capsys):
    """Pruning checks that an old checkpoint's table lists exactly its files (its contents
    are not hashed again: it is going): one holding a file of someone else's is kept aside."""
    path, out = run
    (out / "checkpoints" / "step_00000010" / "notes.txt").write_text("mine")
    args = [str(path), "--train.max_steps=21", "--train.keep_checkpoints=1"]
    assert train.main([*args, "--train.eval_interval=0"]) == 0
    assert names(out) == ["latest", "step_00000010.aside", "step_00000021"]
    assert (out / "checkpoints" / "step_00000010.aside" / "notes.txt").read_text() == "mine"
    assert "notes.txt: not listed" in capsys.readouterr().err


def test_a_same_named_folder_the_trainer_did_not_write_is_kept(run):
    """Saving step 22 where a folder step_00000022 without the trainer's COMPLETE exists."""
    path, out = run
    stray = out / "checkpoints" / "step_00000022"
    stray.mkdir()
    (stray / "data.bin").write_bytes(b"precious")
    assert train.main([str(path), "--train.max_steps=22", "--train.eval_interval=0"]) == 0
    assert (out / "checkpoints" / "step_00000022.aside" / "data.bin").read_bytes() == b"precious"
    assert latest_checkpoint(out).name == "step_00000022"


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
def test_a_trainer_state_of_the_wrong_shape_falls_back_to_an_older_checkpoint(run, capsys, damage):
    path, out = run
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
def test_an_rng_state_of_the_wrong_shape_falls_back(run, capsys, rng):
    path, out = run
    newest = out / "checkpoints" / "step_00000020"
    (newest / "rng_rank0.json").write_text(rng)
    ckpt.write_checksums(newest)
    assert train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"]) == 0
    assert f"{newest / 'rng_rank0.json'}: damaged" in capsys.readouterr().err


def test_universal_index_entries_are_checked(run):
    _, out = run
    newest = out / "checkpoints" / "step_00000020"
    index_file = newest / "universal" / "index.json"
    good = json.loads(index_file.read_text())
    for damage, message in [
        (lambda i: next(iter(i["params"].values())).pop("file"), "must name a .safetensors"),
        (lambda i: next(iter(i["params"].values())).update(file="../x.safetensors"), "beside"),
        (lambda i: i.update(adam_step="20"), "adam_step must be an integer"),
        (lambda i: i.update(engine={"global_steps": "x"}), "engine must map names to numbers"),
    ]:
        index = json.loads(json.dumps(good))
        damage(index)
        index_file.write_text(json.dumps(index))
        with pytest.raises(UniversalStateError, match=rf"{index_file}: damaged: .*{message}"):
            read_index(newest)


def test_the_fingerprint_covers_every_set_training_reads(tmp_path, data_dir):
    from gpt.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    other = json.loads(json.dumps(manifest))
    other["splits"]["train"]["shards"][0]["crc32"] = "00000000"
    cfg = load_config(None, [f"--data.dir={data_dir}", "--finetune.replay_dir=r"])
    saved = {
        "config": {"model": {}, "train": {"dtype": cfg.train.dtype}},
        "world_size": 1,
        "data_fingerprint": ckpt.data_fingerprint({"train": manifest, "replay": manifest}),
    }
    assert set(saved["data_fingerprint"]) == {"train", "replay"}
    ckpt.check_resume(
        cfg, saved, {"train": manifest, "replay": manifest, "law": other}, 1, tmp_path
    )
    with pytest.raises(ConfigError, match=r"data set changed \(finetune.replay_dir = 'r'"):
        ckpt.check_resume(cfg, saved, {"train": manifest, "replay": other}, 1, tmp_path)
    with pytest.raises(ConfigError, match=r"data set changed \(data.dir"):
        ckpt.check_resume(cfg, saved, {"train": other, "replay": manifest}, 1, tmp_path)
    legacy = {**saved, "data_fingerprint": ckpt.data_fingerprint({"train": manifest})["train"]}
    ckpt.check_resume(cfg, legacy, {"train": manifest, "replay": other}, 1, tmp_path)


def test_a_run_already_at_max_steps_says_what_to_set(run, capsys):
    path, out = run
    assert train.main([str(path), "--train.max_steps=20", "--train.eval_interval=0"]) == 0
    err = capsys.readouterr().err
    assert "is already at step 20, at train.max_steps = 20: nothing to train" in err
    assert "--train.max_steps=40" in err
    assert train.main([str(path), "--train.max_steps=12", "--train.eval_interval=0"]) == 0
    assert "already at step 20, past train.max_steps = 12" in capsys.readouterr().err
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000010", "step_00000020"]


def test_latest_names_the_checkpoint_resumed_from_once_the_damaged_one_is_aside(run, capsys):
    path, out = run
    flip_byte(out / "checkpoints" / "step_00000020" / "trainer.json", offset=-5)
    assert train.main([str(path), "--train.max_steps=10", "--train.eval_interval=0"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"
    assert names(out) == ["latest", "step_00000010", "step_00000020.aside"]


def test_a_linked_checkpoint_is_not_one_of_this_run(run, tmp_path):
    """A symbolic link under checkpoints/ (to another run's checkpoint) is never resumed
    from, pruned or removed: the trainer did not write it."""
    path, out = run
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


def test_a_full_disk_reported_by_torch_save_as_runtime_error_is_status_4(run, monkeypatch, capsys):
    from gpt.train.trainer import CHECKPOINT_WRITE_EXIT

    path, out = run

    def full(root):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64")

    monkeypatch.setattr(ckpt, "write_checksums", full)
    args = [str(path), "--train.max_steps=21", "--train.eval_interval=0"]
    assert train.main(args) == CHECKPOINT_WRITE_EXIT
    assert "cannot write checkpoint" in capsys.readouterr().err
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_checkpoint_whose_table_predates_listed_sidecars_still_resumes_and_loads(run, capsys):
    """Tables written before this version left model/checksums.json out (the weights it
    covers are listed): such checkpoints are not damaged."""
    from gpt.store import load_model

    path, out = run
    newest = out / "checkpoints" / "step_00000020"
    table = json.loads((newest / "checksums.json").read_text())
    del table["model/checksums.json"]
    (newest / "checksums.json").write_text(json.dumps(table))
    verify_checksums(newest)
    load_model(out)
    assert train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"]) == 0
    assert f"resuming from {newest}" in capsys.readouterr().out


def test_a_runtime_error_that_is_not_a_failed_write_is_not_called_one(run, monkeypatch):
    path, _ = run

    def bug(root):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(ckpt, "write_checksums", bug)
    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        train.main([str(path), "--train.max_steps=21", "--train.eval_interval=0"])
