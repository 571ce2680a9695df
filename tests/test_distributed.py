"""The trainer in several processes (torchrun, gloo on the CPU): ZeRO 1-3 against one process,
resuming on another world size, a non-finite gradient on one rank only."""

import json

import pytest
import torch
from runs import ROOT, config, copy_run_at, losses, run_script, subprocess_env, torchrun
from safetensors.torch import load_file

from gpt.cli import train


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


POISON = """
import os, runpy, sys
from gpt.train import optim

step, calls = optim.GuardedAdamW.step, {"n": 0}
ranks = {int(r) for r in os.environ["POISON_RANKS"].split(",")}


def poisoned(self, closure=None):
    calls["n"] += 1
    if calls["n"] == 3 and int(os.environ["RANK"]) in ranks:
        # a non-finite value that only this rank's optimizer sees (after the all-reduce)
        grad = next(p.grad for g in self.param_groups for p in g["params"] if p.grad is not None)
        grad.view(-1)[0] = float("nan")
    return step(self, closure)


optim.GuardedAdamW.step = poisoned
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, data_dir):
    """A NaN that only rank 1's optimizer sees at step 3 must skip that step on both ranks
    (GuardedAdamW all-reduces its verdict): the run then equals one whose step 3 was poisoned
    on both ranks, and every parameter stays finite. (At ZeRO 0 the optimizer sees every
    parameter group in one call; under ZeRO 1-3 DeepSpeed's own global gradient-norm check
    skips the step before our optimizer is called.)"""
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    runs = {}
    for name, ranks in (("one", "1"), ("both", "0,1")):
        path, out = config(tmp_path, data_dir, name)
        args = [
            "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
            str(path), "--train.eval_interval=0", "--train.micro_batch_size=2",
        ]  # fmt: skip
        proc = run_script(args, env={**subprocess_env(), "POISON_RANKS": ranks})
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        runs[name] = out
    logged = [json.loads(x) for x in (runs["one"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("skipped")] == [3]
    assert losses(runs["one"]) == losses(runs["both"])
    weights = load_file(
        runs["one"] / "checkpoints" / "step_00000010" / "model" / "model.safetensors"
    )
    assert all(torch.isfinite(t).all() for t in weights.values())
