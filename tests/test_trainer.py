"""The trainer end to end on a tiny model (CPU, gloo): learning, exact resume, signals, kills
during a checkpoint write, non-finite steps, config errors, multi-process equivalence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt.cli import train
from gpt.data.prepare import prepare
from gpt.model import GPT
from gpt.train.checkpoint import complete_checkpoints, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[model]
vocab_size = 257
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = {dropout}
[data]
dir = "{data}"
[train]
out_dir = "{out}"
max_steps = 10
micro_batch_size = 4
grad_accum = 2
eval_interval = 5
eval_steps = 2
ckpt_interval = 5
log_interval = 1
seed = 7
wandb = false
sample_tokens = 0
[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 3
"""
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        picks = torch.randint(0, len(words), (150,), generator=g).tolist()
        (docs / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in picks))
    prepare([str(docs)], root / "bytes", encoding="bytes", val_fraction=0.2, progress=False)
    return root / "bytes"


def config(tmp_path, data_dir, name="run", dropout=0.0):
    out = tmp_path / name
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(data=data_dir, out=out, dropout=dropout))
    return path, out


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out) / "model" / "model.safetensors")


def optimizer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    # our own DeepSpeed checkpoint, written by the test's run: trusted, so a full load is fine
    state = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    flat = {}
    for pid, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            flat[f"{pid}.{key}"] = torch.as_tensor(value)
    return flat


def subprocess_env() -> dict[str, str]:
    """The environment without this process's own (in-process) process-group variables."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def test_overfits_one_batch(tmp_path):
    # a split of exactly block_size + 1 tokens: every random window is the same one
    docs = tmp_path / "one.txt"
    docs.write_text("to be or not to ")  # 16 bytes + end-of-text = 17 tokens
    prepare([str(docs)], tmp_path / "one", encoding="bytes", val_fraction=0.0, progress=False)
    path, out = config(tmp_path, tmp_path / "one")
    code = train.main(
        [
            str(path),
            "--train.max_steps=120",
            "--train.eval_interval=0",
            "--train.ckpt_interval=1000",
            "--optim.warmup_steps=5",
        ]
    )
    assert code == 0
    assert losses(out)[120] < 0.05, losses(out)[120]


def test_metrics_records_have_the_documented_fields(tmp_path, data_dir):
    path, out = config(tmp_path, data_dir)
    assert train.main([str(path)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms"} <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 2 * 16
        assert "mfu" not in r  # a CPU has no known peak: no made-up number
    assert "val_loss" in records[4] and "val_loss" in records[9]
    assert records[-1]["loss"] < records[0]["loss"]
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000005", "step_00000010"]
    assert GPT.from_pretrained(latest_checkpoint(out) / "model").num_params() > 0
    assert (out / "config.toml").is_file()


def test_exact_resume_after_a_crash(tmp_path, data_dir):
    """10 steps straight == 5 steps, lose everything after the step-5 checkpoint, resume."""
    path_a, out_a = config(tmp_path, data_dir, "straight", dropout=0.1)
    path_b, out_b = config(tmp_path, data_dir, "resumed", dropout=0.1)
    assert train.main([str(path_a)]) == 0
    assert train.main([str(path_b), "--train.max_steps=10"]) == 0
    # crash after step 5: its later checkpoint and log lines never happened
    last = latest_checkpoint(out_b)
    (last / "COMPLETE").unlink()
    assert latest_checkpoint(out_b).name == "step_00000005"  # `latest` names an incomplete one
    assert train.main([str(path_b)]) == 0
    assert losses(out_a) == losses(out_b)  # bitwise: single CPU process
    pa, pb = final_params(out_a), final_params(out_b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    oa, ob = optimizer_state(latest_checkpoint(out_a)), optimizer_state(latest_checkpoint(out_b))
    assert len(oa) > 0 and oa.keys() == ob.keys()
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_keeps_the_last_k_checkpoints(tmp_path, data_dir):
    path, out = config(tmp_path, data_dir)
    assert train.main([str(path), "--train.ckpt_interval=2", "--train.keep_checkpoints=2"]) == 0
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000008", "step_00000010"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_non_finite_steps_are_skipped_then_abort(tmp_path, data_dir, monkeypatch, capsys):
    path, out = config(tmp_path, data_dir, "clean")
    assert train.main([str(path), "--train.max_steps=2"]) == 0
    after_two = final_params(out)

    calls = {"n": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 4:  # step 3 onwards (2 micro-batches per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    path, out = config(tmp_path, data_dir, "poisoned")
    code = train.main([str(path), "--train.max_steps=3"])
    assert code == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[2]["skipped"] is True and "skipped" not in records[1]
    skipped = final_params(out)  # saved after the skipped step 3: equal to after step 2
    assert all(torch.equal(skipped[k], after_two[k]) for k in after_two)

    path, out = config(tmp_path, data_dir, "aborted")
    calls["n"] = 0
    code = train.main([str(path), "--train.max_steps=20", "--train.max_nonfinite_steps=3"])
    assert code == train.NONFINITE_EXIT
    err = capsys.readouterr().err
    assert "aborting: 3 consecutive non-finite steps" in err and "up to step 5" in err


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--train.global_batch_size=16",
            "train.global_batch_size = 16 but micro_batch_size (4) x "
            "grad_accum (2) x world size (1) = 8",
        ),
        ("--deepspeed.train_batch_size=8", "deepspeed.train_batch_size is derived"),
        ("--train.dtype=fp8", "train.dtype = 'fp8' is not valid; choose one of fp32, bf16, fp16"),
        ("--data.dir=/no/such/dir", "data directory /no/such/dir does not exist"),
        ("--model.vocab_size=100", "uses bytes with 257 tokens, more than model.vocab_size = 100"),
    ],
)
def test_config_errors_exit_2_with_the_key(tmp_path, data_dir, capsys, override, message):
    path, _ = config(tmp_path, data_dir)
    assert train.main([str(path), override]) == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_a_changed_model_or_data_set(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    assert train.main([str(path), "--train.max_steps=5"]) == 0
    assert train.main([str(path), "--model.n_embd=64"]) == 2
    assert "different model shape: model.n_embd: 32 -> 64" in capsys.readouterr().err
    other = tmp_path / "other"
    prepare(
        [str(data_dir.parent / "docs")], other, encoding="bytes", val_fraction=0.5, progress=False
    )
    assert train.main([str(path), f"--data.dir={other}"]) == 2
    assert "the data set changed" in capsys.readouterr().err


def run_script(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    path_a, out_a = config(tmp_path, data_dir, "straight", dropout=0.1)
    assert train.main([str(path_a), "--train.max_steps=30", "--train.ckpt_interval=100"]) == 0
    path_b, out_b = config(tmp_path, data_dir, "stopped", dropout=0.1)
    args = [
        str(ROOT / "train.py"),
        str(path_b),
        "--train.max_steps=30",
        "--train.ckpt_interval=100",
    ]
    proc = run_script(args)
    metrics = out_b / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=30)
    assert time.time() - sent < 30
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by a signal" in err
    stopped_at = int(latest_checkpoint(out_b).name.split("_")[1])
    assert 3 <= stopped_at < 30
    assert train.main([str(path_b), "--train.max_steps=30", "--train.ckpt_interval=100"]) == 0
    assert losses(out_a) == losses(out_b)
    pa, pb = final_params(out_a), final_params(out_b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


KILL_DURING_SAVE = """
import os, runpy, signal, sys
import gpt.train.checkpoint as ckpt
write = ckpt.write_atomic
def dying_write(path, text):
    if path.name == "COMPLETE" and "step_00000010" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # everything but the marker is on disk
    write(path, text)
ckpt.write_atomic = dying_write
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, data_dir):
    path_a, out_a = config(tmp_path, data_dir, "straight")
    assert train.main([str(path_a), "--train.max_steps=15"]) == 0
    path_b, out_b = config(tmp_path, data_dir, "killed")
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE)
    proc = run_script([str(script), str(path_b), "--train.max_steps=15"])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (out_b / "checkpoints" / "step_00000010.tmp" / "model" / "model.safetensors").exists()
    assert latest_checkpoint(out_b).name == "step_00000005"
    assert train.main([str(path_b), "--train.max_steps=15"]) == 0
    assert losses(out_a) == losses(out_b)
    assert [c.name for c in complete_checkpoints(out_b)][-1] == "step_00000015"
    assert not (out_b / "checkpoints" / "step_00000010.tmp").exists()


def torchrun(path, *overrides):
    args = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(ROOT / "train.py"),
        str(path),
        *overrides,
    ]
    proc = run_script(args)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return proc


def copy_run_at(src: Path, dst: Path, step: int) -> None:
    """``dst`` holds the run ``src`` as if it had stopped after the checkpoint of ``step``."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_with_zero_match_one_process(tmp_path, data_dir, stage):
    """Same global batch (2 x 2 per step, 2 accumulation steps): the same losses as one
    process; a 2-process resume continues its run; one process may not resume it."""
    path_1, out_1 = config(tmp_path, data_dir, "one")
    assert train.main([str(path_1), "--train.eval_interval=0"]) == 0
    two_procs = ["--train.micro_batch_size=2", f"--deepspeed.zero_optimization.stage={stage}"]
    path_2, out_2 = config(tmp_path, data_dir, "two")
    torchrun(path_2, "--train.eval_interval=0", *two_procs)
    one, two = losses(out_1), losses(out_2)
    assert one.keys() == two.keys() == set(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])

    path_r, out_r = config(tmp_path, data_dir, "resumed")
    copy_run_at(out_2, out_r, 5)
    torchrun(path_r, "--train.eval_interval=0", *two_procs)
    resumed = losses(out_r)
    assert resumed.keys() == two.keys()
    for step in two:
        assert abs(resumed[step] - two[step]) <= 1e-6 * abs(two[step]), step

    # a ZeRO checkpoint holds per-process optimizer partitions: one process may not resume it
    err = run_script(
        [
            str(ROOT / "train.py"),
            str(path_2),
            "--train.max_steps=11",
            "--train.micro_batch_size=4",
            f"--deepspeed.zero_optimization.stage={stage}",
        ]
    )
    _, text = err.communicate(timeout=120)
    assert err.returncode == 2
    assert "saved by 2 processes with ZeRO stage" in text and "resumed by 1" in text


@pytest.mark.slow
def test_resume_on_more_processes_and_zero3_export(tmp_path, data_dir):
    """Without ZeRO a 1-process checkpoint resumes on 2 processes and continues the same run;
    ZeRO-3 matches 1 process and its exported model holds whole, equal parameters."""
    path_1, out_1 = config(tmp_path, data_dir, "straight")
    assert train.main([str(path_1), "--train.eval_interval=0"]) == 0
    path_2, out_2 = config(tmp_path, data_dir, "grown")
    copy_run_at(out_1, out_2, 5)  # the straight run as if stopped after step 5
    torchrun(path_2, "--train.eval_interval=0", "--train.micro_batch_size=2")
    one, two = losses(out_1), losses(out_2)
    assert one.keys() == two.keys() == set(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])

    path_3, out_3 = config(tmp_path, data_dir, "zero3")
    torchrun(
        path_3,
        "--train.sample_tokens=4",  # evaluation and sampling with partitioned parameters
        "--train.micro_batch_size=2",
        "--deepspeed.zero_optimization.stage=3",
    )
    assert losses(out_3).keys() == one.keys()
    records = [json.loads(x) for x in (out_3 / "metrics.jsonl").open()]
    assert [len(r["samples"]) for r in records if "val_loss" in r] == [1, 1]
    for step, loss in losses(out_3).items():
        assert abs(loss - one[step]) <= 1e-5 * abs(loss), (step, loss, one[step])
    exported = load_file(out_3 / "checkpoints" / "step_00000005" / "model" / "model.safetensors")
    reference = load_file(out_1 / "checkpoints" / "step_00000005" / "model" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert exported[name].shape == tensor.shape, name
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_bench_mode_times_each_backend_and_writes_no_checkpoint(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    args = [str(path), "--bench.steps=2", "--bench.warmup=1", "--bench.compile=[false]"]
    assert train.main([*args, '--bench.backends=["naive", "sdpa"]']) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [(r["attention"], r["compile"], r["status"]) for r in report["results"]] == [
        ("naive", False, "ok"),
        ("sdpa", False, "ok"),
    ]
    for r in report["results"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_ms"] * 1e3)
        assert r["mfu"] is None  # no peak is known for a CPU: no made-up MFU
    assert report["tokens_per_step"] == 4 * 2 * 16 and "naive" in capsys.readouterr().out
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert train.main([*args, '--bench.backends=["fast"]']) == 2
    assert "bench.backends: unknown attention backend(s) fast" in capsys.readouterr().err
    assert train.main([str(path), "--bench.steps=-1"]) == 2
    assert "got bench.steps = -1, bench.warmup = 3" in capsys.readouterr().err


def test_evaluation_samples_are_logged_and_leave_training_unchanged(tmp_path, data_dir):
    path_a, out_a = config(tmp_path, data_dir, "quiet", dropout=0.1)
    assert train.main([str(path_a)]) == 0
    path_b, out_b = config(tmp_path, data_dir, "talking", dropout=0.1)
    prompts = '--train.sample_prompts=["the ", "a lazy"]'
    assert train.main([str(path_b), "--train.sample_tokens=12", prompts]) == 0
    assert losses(out_a) == losses(out_b)  # sampling draws from its own generator
    records = [json.loads(x) for x in (out_b / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert set(r["samples"]) == {"the ", "a lazy"}
        assert all(0 < len(text) <= 12 for text in r["samples"].values())  # bytes: 1 char/token
    assert all("samples" not in json.loads(x) for x in (out_a / "metrics.jsonl").open())
