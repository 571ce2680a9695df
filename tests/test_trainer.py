"""The trainer end to end on a tiny model in one CPU process: what it computes (against a
hand-written PyTorch loop), exact resume, signals, kills during a checkpoint write, non-finite
steps, config errors and evaluation samples."""

import json
import signal
import time

import pytest
import torch
from runs import (
    ROOT,
    config,
    final_params,
    losses,
    optimizer_state,
    records,
    run_script,
)

from gpt.cli import train
from gpt.config_io import load_config
from gpt.data.loader import TokenLoader
from gpt.data.prepare import prepare
from gpt.model import GPT
from gpt.store import complete_checkpoints, latest_checkpoint
from gpt.train.optim import lr_at
from gpt.train.trainer import NONFINITE_EXIT


def reference_run(cfg, val_dirs: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The run of ``cfg`` written as a plain PyTorch loop, independently of the trainer and
    DeepSpeed: AdamW with decay on matrices only, the learning rate of ``lr_at`` set before
    every step, gradients accumulated as the mean over micro-batches, the global norm clipped,
    validation as the mean loss over ``eval_steps`` batches. Returns the records the trainer
    should log (one per step) and the final parameters."""
    t, o = cfg.train, cfg.optim
    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": o.weight_decay}, {"params": vectors}],
        weight_decay=0.0,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )
    batches = dict(block_size=cfg.model.block_size, micro_batch_size=t.micro_batch_size)
    train_data = TokenLoader(cfg.data.dir, "train", **batches, seed=t.seed)
    out = []
    for step in range(t.max_steps):
        lr = lr_at(step, o, t.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = []
        for _ in range(t.grad_accum):
            _, loss = model(*train_data.next_batch())
            (loss / t.grad_accum).backward()
            micro.append(loss.item())
        # the norm summed in the optimizer's parameter order, so that rounding agrees too
        norm = torch.nn.utils.clip_grad_norm_(matrices + vectors, o.grad_clip)
        opt.step()
        opt.zero_grad()
        record = {"step": step + 1, "loss": sum(micro) / len(micro), "lr": lr, "grad_norm": norm}
        if (step + 1) % t.eval_interval == 0:
            with torch.no_grad():
                for name, directory in val_dirs.items():
                    val = TokenLoader(directory, "val", **batches, seed=t.seed, mode="sequential")
                    mean = sum(model(*val.next_batch())[1].item() for _ in range(t.eval_steps))
                    record[name] = mean / t.eval_steps
        out.append(record)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_logged_numbers_and_final_weights_equal_a_plain_pytorch_loop(tmp_path, data_dir):
    """loss (mean over grad_accum micro-batches), lr (as applied), grad_norm (before
    clipping), val_loss and val_loss/<name> (means over eval_steps), and the final weights,
    against ``reference_run``. One process on the CPU runs the same float32 operations in
    the same order, so every number agrees to the last bit."""
    other = tmp_path / "other"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * 9)
    prepare([str(docs)], other, encoding="bytes", val_fraction=0.5, progress=False)
    path, out = config(tmp_path, data_dir)
    extra = f'--data.extra_val={{other = "{other}"}}'
    args = [str(path), "--train.max_steps=6", "--train.eval_interval=3", extra]
    assert train.main(args) == 0
    cfg = load_config(path, args[1:])
    expected, weights = reference_run(cfg, {"val_loss": data_dir, "val_loss/other": other})
    logged = records(out)
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == list(range(1, 7))
    for got, want in zip(logged, expected, strict=True):
        assert got["loss"] == want["loss"], got["step"]  # the same float32 losses, summed alike
        assert got["lr"] == want["lr"]
        assert got["grad_norm"] == want["grad_norm"].item()
        for key in ("val_loss", "val_loss/other"):
            assert (key in got) == (key in want)
            if key in want:
                assert got[key] == want[key], (got["step"], key)
    exported = GPT.from_pretrained(latest_checkpoint(out) / "model").state_dict()
    assert exported.keys() == weights.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, weights[name]), name


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
    logged = records(out)
    assert [r["step"] for r in logged] == list(range(1, 11))
    for r in logged:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms"} <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 2 * 16
        assert "mfu" not in r  # a CPU has no known peak: no made-up number
    assert "val_loss" in logged[4] and "val_loss" in logged[9]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000005", "step_00000010"]
    assert GPT.from_pretrained(latest_checkpoint(out) / "model").num_params() > 0
    assert (out / "config.toml").is_file()
    sdpa = json.loads((out / "run.json").read_text())["sdpa"]  # the SDPA kernel that ran
    assert sdpa["kernel"] == "flash" and sdpa["priority"] == ["flash", "efficient", "math"]


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
    logged = records(out)
    assert logged[2]["skipped"] is True and "skipped" not in logged[1]
    skipped = final_params(out)  # saved after the skipped step 3: equal to after step 2
    assert all(torch.equal(skipped[k], after_two[k]) for k in after_two)

    path, out = config(tmp_path, data_dir, "aborted")
    calls["n"] = 0
    code = train.main([str(path), "--train.max_steps=20", "--train.max_nonfinite_steps=3"])
    assert code == NONFINITE_EXIT
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
        ('--model.sdpa_kernels=["cudnnn"]', "model.sdpa_kernels: unknown SDPA kernel(s) 'cudnnn'"),
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
    # the SDPA kernel order and the chunked loss change no weight: the run continues
    runtime = ['--model.sdpa_kernels=["math"]', "--model.loss_chunk=16", "--train.max_steps=6"]
    assert train.main([str(path), *runtime]) == 0
    assert "resuming from" in capsys.readouterr().out


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


def test_evaluation_samples_are_logged_and_leave_training_unchanged(tmp_path, data_dir):
    path_a, out_a = config(tmp_path, data_dir, "quiet", dropout=0.1)
    assert train.main([str(path_a)]) == 0
    path_b, out_b = config(tmp_path, data_dir, "talking", dropout=0.1)
    prompts = '--train.sample_prompts=["the ", "a lazy"]'
    assert train.main([str(path_b), "--train.sample_tokens=12", prompts]) == 0
    assert losses(out_a) == losses(out_b)  # sampling draws from its own generator
    evals = [r for r in records(out_b) if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert set(r["samples"]) == {"the ", "a lazy"}
        assert all(0 < len(text) <= 12 for text in r["samples"].values())  # bytes: 1 char/token
    assert all("samples" not in r for r in records(out_a))


def test_the_loop_in_the_training_docs_is_the_loop_in_the_code():
    """docs/training.md shows Trainer.fit's loop: the code it shows is the code that runs."""
    import inspect
    import re

    from gpt.train.trainer import Trainer

    doc = (ROOT / "docs" / "training.md").read_text()
    shown = re.search(r"```python\n(while self.step < t.max_steps:\n.*?)```", doc, re.S).group(1)
    source = inspect.getsource(Trainer.fit)
    start = source.index("        while self.step < t.max_steps:")
    end = source.index("        self.log.close()")
    code = "".join(line[8:] for line in source[start:end].splitlines(keepends=True))
    strip = lambda text: [re.sub(r"\s*#.*", "", line).rstrip() for line in text.splitlines()]  # noqa: E731
    assert strip(shown) == strip(code)
