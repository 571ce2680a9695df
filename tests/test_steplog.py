"""gpt/train/steplog.py: which steps are recorded, what a record holds, the non-finite
verdict, and that evaluations join their step's record. One process, CPU tensors."""

import json
import math

import pytest
import torch

from gpt.config import TrainConfig
from gpt.train.steplog import StepLog


def make_log(tmp_path, step=0, **train):
    t = TrainConfig(
        **{"max_steps": 20, "log_interval": 5, "grad_accum": 2, "max_nonfinite_steps": 3, **train}
    )
    return StepLog(t, tmp_path, step, tokens_per_step=64, flops_per_token=10.0, peak_flops=None)


def records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def add(log, step, loss_sum=3.0, skipped=0.0, norm=1.5, tokens=None):
    sums = torch.tensor(loss_sum, dtype=torch.float64)
    log.add(step, 64 * step if tokens is None else tokens, 1e-3 * step, sums, skipped, norm)


def test_only_log_steps_the_last_step_and_bad_steps_are_recorded(tmp_path):
    log = make_log(tmp_path)
    for step in range(1, 21):
        add(log, step, skipped=torch.tensor(1.0 if step == 7 else 0.0))
        if log.due(step) or step == 9:
            log.flush()
    got = [r["step"] for r in records(tmp_path)]
    assert got == [5, 7, 10, 15, 20]
    assert [r.get("skipped", False) for r in records(tmp_path)] == [0, 1, 0, 0, 0]
    assert log.pending == [] and log.abort_at is None


def test_a_record_holds_the_mean_loss_over_micro_batches_and_the_tokens_it_was_given(tmp_path):
    log = make_log(tmp_path)
    for step in range(1, 6):
        # tokens deliberately not step * tokens_per_step (a run resized on resume)
        add(log, step, loss_sum=2.0 * step, norm=torch.tensor(0.25), tokens=1000 + step)
    log.flush()
    (r,) = records(tmp_path)
    assert r["step"] == 5 and r["tokens"] == 1005
    assert r["loss"] == pytest.approx(5.0)  # sum 10 over grad_accum 2
    assert r["lr"] == pytest.approx(5e-3) and r["grad_norm"] == 0.25
    assert r["tokens_per_s"] == pytest.approx(64 / (r["step_ms"] / 1000))
    assert "mfu" not in r  # no peak known


def test_mfu_is_flops_per_token_times_tokens_per_s_over_peak(tmp_path):
    t = TrainConfig(max_steps=2, log_interval=1)
    log = StepLog(t, tmp_path, 0, tokens_per_step=64, flops_per_token=10.0, peak_flops=1e4)
    add(log, 1)
    log.flush()
    (r,) = records(tmp_path)
    assert r["mfu"] == pytest.approx(10.0 * r["tokens_per_s"] / 1e4)


@pytest.mark.parametrize(
    ("bad", "abort_at"),
    [
        ({3, 4, 5}, 5),  # three in a row
        ({3, 4, 6, 7}, None),  # never three in a row
        ({2, 3, 4, 5, 6}, 4),  # the first step that completes the run of three
        ({4, 5, 6}, 6),  # a run across a flush (at 4) still counts
    ],
)
def test_the_nonfinite_verdict_counts_consecutive_bad_steps_across_flushes(tmp_path, bad, abort_at):
    log = make_log(tmp_path, max_steps=10)
    for step in range(1, 11):
        add(log, step, skipped=torch.tensor(float(step in bad)))
        if step % 4 == 0:  # flushes at 4 and 8 split the runs
            log.flush()
    log.flush()
    assert log.abort_at == abort_at


def test_a_nonfinite_loss_is_bad_even_when_the_optimizer_did_not_skip(tmp_path):
    log = make_log(tmp_path, max_nonfinite_steps=2)
    add(log, 1, loss_sum=math.nan)
    add(log, 2, loss_sum=math.inf)
    log.flush()
    assert log.abort_at == 2
    assert [r["skipped"] for r in records(tmp_path)] == [True, True]


def test_host_flags_and_missing_norms_are_read_as_they_are(tmp_path):
    log = make_log(tmp_path, log_interval=1)
    add(log, 1, skipped=1.0, norm=None)  # a DeepSpeed fp16 wrapper's own flag, no norm
    add(log, 2, skipped=0.0, norm=torch.tensor(2.0))
    log.flush()
    first, second = records(tmp_path)
    assert first["skipped"] is True and first["grad_norm"] is None
    assert "skipped" not in second and second["grad_norm"] == 2.0


def test_an_evaluation_joins_the_last_pending_steps_record_only(tmp_path):
    log = make_log(tmp_path)
    for step in (1, 2, 3):  # none a log step
        add(log, step)
    log.flush({"val_loss": 2.5, "samples": {"A": "b"}})
    (r,) = records(tmp_path)
    assert r["step"] == 3 and r["val_loss"] == 2.5 and r["samples"] == {"A": "b"}
    assert r["loss"] == pytest.approx(1.5)


def test_an_evaluation_alone_is_its_own_record(tmp_path, capsys):
    log = make_log(tmp_path)
    log.evaluation(0, 0, {"val_loss": 4.25, "val_loss/other": 5.0})
    assert records(tmp_path) == [{"step": 0, "tokens": 0, "val_loss": 4.25, "val_loss/other": 5.0}]
    out = capsys.readouterr()
    assert "step 0: val_loss 4.2500 | val_loss/other 5.0000" in out.out + out.err


def test_flush_with_nothing_pending_writes_nothing(tmp_path):
    log = make_log(tmp_path)
    log.flush({"val_loss": 1.0})
    assert records(tmp_path) == []


def test_a_resumed_log_drops_the_records_after_the_checkpoint(tmp_path):
    log = make_log(tmp_path, log_interval=1)
    for step in (1, 2, 3):
        add(log, step)
    log.flush()
    resumed = make_log(tmp_path, step=2, log_interval=1)
    assert [r["step"] for r in records(tmp_path)] == [1, 2]
    add(resumed, 3)
    resumed.flush()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
