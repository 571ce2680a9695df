"""Issue 12, each item reproduced as it was found: no code from checkpoints, one job per run
directory, damage detected and named, a full disk loses nothing, messages instead of
tracebacks. (The data-set items are in test_data_reliability.py, the config walk in
test_config.py, the KV-cache masks in the attention tests.)"""

import errno
import json
import os
import pickle
import re
import shutil
import signal

import pytest
import torch
from runs import config, losses, run_script

from gpt.cli import train
from gpt.model import GPT
from gpt.store import complete_checkpoints, latest_checkpoint
from gpt.train import checkpoint as ckpt
from gpt.train.trainer import CHECKPOINT_WRITE_EXIT


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def flip_byte(path, offset=-100):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished 10-step run with checkpoints at 5 and 10 (trained once)."""
    path, out = config(tmp_path_factory.mktemp("finished"), data_dir)
    assert train.main([str(path), "--train.eval_interval=0"]) == 0
    return out


@pytest.fixture
def run(tmp_path, data_dir, finished):
    """A copy of the finished run for one test to damage, and its config."""
    path, out = config(tmp_path, data_dir)
    shutil.copytree(finished, out)
    return path, out


def test_a_checkpoint_never_runs_code_even_with_consistent_checksums(run, tmp_path, capsys):
    path, out = run
    marker = tmp_path / "pwned"
    states = latest_checkpoint(out) / "ds" / "state" / "mp_rank_00_model_states.pt"
    genuine = torch.load(states, weights_only=False)  # our own file: trusted
    genuine["payload"] = Payload(marker)
    states.write_bytes(pickle.dumps(genuine))
    ckpt.write_checksums(latest_checkpoint(out))  # an attacker would make them agree
    assert train.main([str(path), "--train.max_steps=12", "--train.eval_interval=0"]) == 0
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"skipping checkpoint {latest_checkpoint(out).parent / 'step_00000010'}" in err
    assert "refusing to load" in err and "mp_rank_00_model_states.pt" in err
    # it resumed from step 5, the checkpoint before the hostile one, and trained on
    assert [c.name for c in complete_checkpoints(out)][-1] == "step_00000012"


def test_a_flipped_byte_in_the_latest_checkpoint_falls_back_to_the_previous(
    run, tmp_path, data_dir, capsys
):
    path, out = run
    weights = out / "checkpoints" / "step_00000010" / "model" / "model.safetensors"
    flip_byte(weights)
    assert train.main([str(path), "--train.max_steps=10", "--train.eval_interval=0"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {weights.parents[1]}" in err and "checksum mismatch" in err
    assert str(weights) in err
    # retrained 6..10 from step 5: the same losses as the first time (one CPU process)
    straight_path, straight = config(tmp_path, data_dir, "straight")
    assert train.main([str(straight_path), "--train.eval_interval=0"]) == 0
    assert losses(out) == losses(straight)


def test_every_checkpoint_damaged_refuses_to_start_afresh(run, capsys):
    path, out = run
    for c in complete_checkpoints(out):
        (c / "trainer.json").write_text("{not json")
    assert train.main([str(path), "--train.max_steps=12", "--train.eval_interval=0"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "trainer.json: unreadable" in err
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000005", "step_00000010"]


def test_a_flipped_byte_in_an_export_is_named_by_every_loader(run, tmp_path, capsys):
    _, out = run
    model_dir = latest_checkpoint(out) / "model"
    flip_byte(model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):
        GPT.from_pretrained(model_dir)
    from gpt.cli import sample

    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(model_dir), "--prompt", "the", "--max-new-tokens", "2"])
    assert info.value.code == 2
    assert "model.safetensors: checksum mismatch" in capsys.readouterr().err


def test_a_truncated_export_without_a_sidecar_is_named(run):
    _, out = run
    model_dir = latest_checkpoint(out) / "model"
    (model_dir / "checksums.json").unlink()  # as exported before sidecars existed
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"{weights}: cannot read the weights"):
        GPT.from_pretrained(model_dir)


HOLD_LOCK = """
import sys, time
from gpt.train.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_the_same_run_directory_is_refused(
    tmp_path, data_dir, capsys, monkeypatch
):
    """Another job holds the run directory (here a process holding its lock the way the
    trainer does): the trainer refuses with status 2, naming the holder, and writes nothing;
    before the process group starts, i.e. before DeepSpeed builds its op (minutes on a fresh
    installation)."""
    path, out = config(tmp_path, data_dir)

    def too_late(*args, **kwargs):
        raise AssertionError("the process group started before the run directory was taken")

    monkeypatch.setattr(train, "init_distributed", too_late)
    holder = run_script(["-c", HOLD_LOCK, str(out)])
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main([str(path), "--train.eval_interval=0"]) == 2
        err = capsys.readouterr().err
        assert f"{out}: the run directory is in use by another job" in err
        assert f"pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == ["LOCK"]
    finally:
        holder.kill()
        holder.communicate()


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    out.mkdir()
    # what a job killed with -9 leaves: a holder record, but no live lock on the file
    (out / "LOCK").write_text(json.dumps({"host": "gone", "pid": 999999, "since": "earlier"}))
    assert train.main([str(path), "--train.max_steps=2", "--train.eval_interval=0"]) == 0
    err = capsys.readouterr().err
    assert "taking over" in err and "'pid': 999999" in err
    assert (out / "LOCK").read_text() == ""  # a clean exit leaves no holder behind


def test_a_full_disk_during_a_checkpoint_loses_nothing(run, tmp_path, monkeypatch, capsys):
    path, out = run
    real = ckpt.write_checksums

    def full_disk(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "checksums.json"))

    monkeypatch.setattr(ckpt, "write_checksums", full_disk)
    args = [str(path), "--train.max_steps=15", "--train.eval_interval=0"]
    assert train.main(args) == CHECKPOINT_WRITE_EXIT
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "step_00000015" in err
    assert "No space left on device" in err and "previous ones are intact" in err
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert latest_checkpoint(out).name == "step_00000010"
    monkeypatch.setattr(ckpt, "write_checksums", real)
    assert train.main(args) == 0  # resumes from step 10


def test_partial_checkpoints_of_a_killed_run_are_removed_at_the_next_start(run, capsys):
    path, out = run
    partial = out / "checkpoints" / "step_00000015.tmp"
    (partial / "ds").mkdir(parents=True)
    (partial / "ds" / "big.pt").write_bytes(b"\0" * 1000)
    assert train.main([str(path), "--train.max_steps=11", "--train.eval_interval=0"]) == 0
    assert not partial.exists()
    assert f"removed the partial checkpoint {partial}" in capsys.readouterr().err


def test_a_damaged_shard_is_a_message_not_a_traceback(tmp_path, data_dir, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    flip_byte(copy / "train_000000.bin")
    path, _ = config(tmp_path, copy)
    assert train.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "train_000000.bin" in err
    assert "Traceback" not in err


def test_sigint_stops_saves_and_exits_130(tmp_path, data_dir, monkeypatch, capsys):
    path, out = config(tmp_path, data_dir)
    forward = GPT.forward
    calls = {"n": 0}

    def interrupted(self, idx, targets=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 3 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "forward", interrupted)
    assert train.main([str(path), "--train.eval_interval=0"]) == 130
    assert "stopped by a signal (SIGINT) after step 3" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "step_00000003"
    monkeypatch.setattr(GPT, "forward", forward)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_non_finite_parameters_are_never_saved(run, tmp_path):
    from gpt.config_io import load_config
    from gpt.train.engine import build_engine

    path, out = run
    cfg = load_config(path)
    model = GPT(cfg.model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    engine, _ = build_engine(model, cfg, 1)
    with pytest.raises(RuntimeError, match="step 99: parameters are not finite"):
        ckpt.save_checkpoint(engine, tmp_path / "nan", 99, {})
    assert not (tmp_path / "nan" / "checkpoints").exists()


@pytest.mark.parametrize("entry", [["train.py"], ["sample.py"], ["-m", "gpt.eval"]])
def test_ctrl_c_while_the_imports_load_is_an_exit_status_not_a_traceback(entry):
    """SIGINT while torch is being imported (seen in -X importtime's report, so the signal
    lands mid-import however loaded the machine is) exits 130 without a traceback."""
    from runs import ROOT

    script = [str(ROOT / entry[0])] if entry[0].endswith(".py") else entry
    proc = run_script(["-X", "importtime", *script, "--help"])
    seen = []
    for line in proc.stderr:  # one line as each module finishes importing
        seen.append(line)
        if re.search(r"\|\s+torch\.", line):  # a first part of torch: torch itself is loading
            break
    assert proc.poll() is None, "the imports finished before torch's: " + "".join(seen[-5:])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out[-500:], err[-2000:])
    assert "Traceback" not in err
