"""Cluster runs on the CPU (gloo): two "nodes" on the loopback interface, resuming on another
number of processes for ZeRO 0-3, a signal to one rank, train.time_limit, and a rank killed
with SIGKILL. Every run has the same global batch (8 sequences: 4 x 2 accumulation steps on
one process, 2 x 2 on two, 1 x 2 on four), so every world size follows the same run, up to
the rounding of reductions in another order (1e-5 relative)."""

import contextlib
import json
import os
import signal
import sys
import time

import psutil
import pytest
import torch
from runs import (
    ROOT,
    config,
    copy_run_at,
    free_port,
    kill_tree,
    logged_popen,
    losses,
    output,
    records,
    subprocess_env,
    torchrun,
    torchrun_nodes,
    wait_for_records,
)
from safetensors.torch import load_file

from gpt.cli import train
from gpt.store import complete_checkpoints, latest_checkpoint, verify_checksums
from gpt.train.trainer import TIME_LIMIT_EXIT

# n_embd = 30: parameters whose size 4 does not divide (ZeRO-3 pads the last slice)
RUN = ["--model.n_embd=30", "--train.eval_interval=0", "--train.max_steps=6"]
RUN += ["--train.ckpt_interval=3"]


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def batch(world: int) -> str:
    return f"--train.micro_batch_size={4 // world}"


def zero(stage: int) -> str:
    return f"--deepspeed.zero_optimization.stage={stage}"


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)


def universal_state(run) -> dict[str, torch.Tensor]:
    """The universal state of a run's step-6 checkpoint, whichever ranks wrote it."""
    state = {}
    for part in (run / "checkpoints/step_00000006/universal").glob("*.safetensors"):
        state.update(load_file(part))
    return state


def state_gap(run, reference) -> dict[str, float]:
    """Largest difference of each kind of state (fp32 weight, Adam moments) between two runs
    at step 6, relative to the largest value of the tensor in ``reference``."""
    got, want = universal_state(run), universal_state(reference)
    assert got.keys() == want.keys()
    gaps = {}
    for name, tensor in want.items():
        kind = name.split("/")[-1]
        gap = (got[name] - tensor).abs().max().item() / tensor.abs().max().item()
        gaps[kind] = max(gaps.get(kind, 0.0), gap)
    assert {"fp32", "exp_avg", "exp_avg_sq"} <= gaps.keys()
    return gaps


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Uninterrupted runs shared by the tests, made on first use: ``runs(key)`` is the run
    directory of "one" (1 process, in process), "nodes1" / "nodes2" (two nodes on loopback
    with 1 / 2 processes each) and "zero{s}" (2 processes, ZeRO stage s; stage 0 is the
    two-node run with 1 process each)."""
    root = tmp_path_factory.mktemp("cluster")
    made = {}

    def get(key: str):
        if key not in made:
            path, out = config(root, data_dir, key)
            if key == "one":
                assert train.main([str(path), *RUN, batch(1)]) == 0
            elif key.startswith("nodes"):
                nproc = int(key[-1])
                torchrun_nodes(path, *RUN, batch(2 * nproc), nproc=nproc)
            elif key == "zero0":
                return get("nodes1")
            else:
                torchrun(path, *RUN, batch(2), zero(int(key[-1])))
            made[key] = out
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_two_nodes_on_loopback_match_one_process(runs, nproc):
    """torchrun --nnodes 2 --node_rank R --rdzv_endpoint 127.0.0.1:PORT, twice."""
    one, nodes = losses(runs("one")), losses(runs(f"nodes{nproc}"))
    assert nodes.keys() == one.keys() == set(range(1, 7))
    assert_close(nodes, one, one)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_on_another_world_size(runs, tmp_path, data_dir, stage):
    """A 2-process checkpoint of step 3 resumes on 1 process (every stage) and on 4 (stages 2
    and 3: stage 1 partitions the optimizer state as stage 2 does, stage 0 not at all), and
    continues as an uninterrupted run on that many processes does; the resumed run's Adam
    state at the end equals the uninterrupted one's (so it was carried over, not rebuilt)."""
    two = runs(f"zero{stage}")
    one = runs("one")
    assert_close(losses(two), losses(one), range(1, 7))  # ZeRO on 2 processes = 1 process

    path, out = config(tmp_path, data_dir, "on_one")
    copy_run_at(two, out, 3)
    assert train.main([str(path), *RUN, batch(1), zero(stage)]) == 0
    assert_close(losses(out), losses(one), range(4, 7))
    assert (
        json.loads((out / "checkpoints/step_00000006/trainer.json").read_text())["loader"]
        == json.loads((one / "checkpoints/step_00000006/trainer.json").read_text())["loader"]
    )
    # Adam's state at the end, against the uninterrupted run's: as close as the 2-process
    # run's is (Adam turns rounding in tiny gradients into visible weight differences)
    baseline, gap = state_gap(two, one), state_gap(out, one)
    for kind in gap:
        assert gap[kind] <= 4 * baseline[kind] + 1e-6, (kind, gap, baseline)

    if stage == 2:  # the same world: DeepSpeed's own files, the same run to the last bits
        path, out = config(tmp_path, data_dir, "on_two")
        copy_run_at(two, out, 3)
        torchrun(path, *RUN, batch(2), zero(stage))
        resumed, straight = losses(out), losses(two)
        assert resumed.keys() == straight.keys()
        for step, loss in straight.items():
            assert abs(resumed[step] - loss) <= 1e-6 * abs(loss), step

    if stage in (2, 3):
        path, out = config(tmp_path, data_dir, "on_four")
        copy_run_at(two, out, 3)
        torchrun(path, *RUN, batch(4), zero(stage), nproc=4)
        assert_close(losses(out), losses(runs("nodes2")), range(4, 7))


@pytest.mark.slow
def test_another_zero_stage_resumes_through_universal_state_and_refused_without(
    runs, tmp_path, data_dir, capsys
):
    """One process: a ZeRO-1 checkpoint resumes under ZeRO-3 (the run continues as the
    uninterrupted one); with train.universal_checkpoint = false there are only DeepSpeed's
    ZeRO-1 slices, so ZeRO-3 is refused (status 2, both layouts named) and ZeRO-1 resumes."""
    one = losses(runs("one"))
    for universal in ("true", "false"):
        path, out = config(tmp_path, data_dir, f"universal_{universal}")
        args = [str(path), *RUN, batch(1), f"--train.universal_checkpoint={universal}"]
        assert train.main([*args, zero(1), "--train.max_steps=3"]) == 0
        assert (latest_checkpoint(out) / "universal").is_dir() == (universal == "true")
        status = train.main([*args, zero(3)])
        err = capsys.readouterr().err
        if universal == "true":
            assert status == 0
            assert "was saved by 1 process(es) with ZeRO stage 1: loaded from its universal/" in err
            assert_close(losses(out), one, range(4, 7))
        else:
            assert status == 2
            layouts = "saved by 1 process(es), ZeRO stage 1, dtype fp32, resumed by 1 "
            assert layouts + "process(es), ZeRO stage 3, dtype fp32" in err, err
            assert "it has no universal/ state" in err, err
            assert train.main([*args, zero(1)]) == 0  # the same layout: DeepSpeed's files
            assert "universal/" not in capsys.readouterr().err
            assert list(losses(out)) == [1, 2, 3, 4, 5, 6]


# Stand-ins for srun and scontrol on one machine, so that scripts/slurm.sbatch runs as is:
# srun starts $FAKE_NTASKS copies of its command with SLURM's task variables, records each
# one's pid and exit status, and returns the highest status (as srun does).
FAKE_SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < FAKE_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$FAKE_NTASKS "$@" &
    pids+=($!)
    echo $! > "$FAKE_DIR/pid$i"
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; s=$?
    echo $s > "$FAKE_DIR/status$i"
    ((s > status)) && status=$s
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then echo localhost; else echo "$@" >> "$FAKE_DIR/scontrol.log"; fi
"""


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_and_the_job_requeues(tmp_path, data_dir):
    """scripts/slurm.sbatch with 2 tasks (srun and scontrol faked); SIGUSR1 goes to rank 1
    only. Both ranks stop after the same step and exit 138 (128 + SIGUSR1), one complete
    checkpoint of that step is left, the script requeues the job and exits 138; the
    checkpoint resumes (here on one process) to the end."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = subprocess_env()
    env.update(
        PATH=f"{fake}:{env['PATH']}",
        FAKE_DIR=str(fake),
        FAKE_NTASKS="2",
        PYTHON=sys.executable,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_PORT=str(free_port()),
    )
    path, out = config(tmp_path, data_dir, "preempted")
    args = [*RUN, "--train.max_steps=300", "--train.ckpt_interval=1000"]
    script = ["bash", str(ROOT / "scripts/slurm.sbatch"), str(path), *args, batch(2)]
    job = logged_popen(script, tmp_path / "job.log", env)
    try:
        wait_for_records(out, 3, [job])
        os.kill(int((fake / "pid1").read_text()), signal.SIGUSR1)
        job.wait(timeout=120)
    finally:
        kill_tree(job)
    sigusr1 = 128 + signal.SIGUSR1
    statuses = [int((fake / f"status{r}").read_text()) for r in (0, 1)]
    assert statuses == [sigusr1, sigusr1] and job.returncode == sigusr1, output(job)[-3000:]
    assert "stopped by a signal (SIGUSR1)" in output(job)
    assert (fake / "scontrol.log").read_text() == "requeue 4242\n"
    (ckpt,) = complete_checkpoints(out)
    stopped_at = int(ckpt.name.split("_")[1])
    assert 3 <= stopped_at < 300
    assert [r["step"] for r in records(out)][-1] == stopped_at
    verify_checksums(ckpt)
    assert sorted(p.name for p in ckpt.glob("rng_rank*.json")) == [
        "rng_rank0.json",
        "rng_rank1.json",
    ]
    assert train.main([str(path), *args, batch(1), f"--train.max_steps={stopped_at + 2}"]) == 0
    assert list(losses(out)) == list(range(1, stopped_at + 3))


def test_time_limit_stops_saves_and_exits_5(tmp_path, data_dir, capsys):
    """train.time_limit counts from the start of the process: this one (pytest) started
    longer ago than 1 s, so the run stops after its first step, with a checkpoint of it."""
    path, out = config(tmp_path, data_dir, "late")
    args = [str(path), *RUN, "--train.max_steps=1000", "--train.ckpt_interval=1000"]
    assert train.main([*args, "--train.time_limit=1"]) == TIME_LIMIT_EXIT == 5
    assert "stopped at train.time_limit (1 s) after step 1" in capsys.readouterr().err
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000001"]
    assert train.main([*args, "--train.max_steps=2"]) == 0  # resumed: same command, no limit
    assert list(losses(out)) == [1, 2]


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(tmp_path, data_dir):
    """kill -9 of rank 1 under torchrun: rank 0 does not wait forever (gloo sees the closed
    connection; torchrun stops the others), the launcher exits non-zero within a bound, and
    the last complete checkpoint passes its checksums and resumes."""
    path, out = config(tmp_path, data_dir, "killed")
    args = [*RUN, "--train.max_steps=300", "--train.ckpt_interval=4", batch(2)]
    launcher = logged_popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(ROOT / "train.py"),
            str(path),
            *args,
        ],
        tmp_path / "torchrun.log",
        subprocess_env(),
    )
    workers = []
    try:
        wait_for_records(out, 6, [launcher])
        workers = psutil.Process(launcher.pid).children(recursive=True)
        (victim,) = [w for w in workers if w.environ().get("RANK") == "1"]
        victim.kill()
        killed = time.time()
        launcher.wait(timeout=120)
        elapsed = time.time() - killed
        left = [w.pid for w in workers if alive(w)]
    finally:
        kill_tree(launcher)
        for worker in workers:  # in sessions of their own, and orphans once torchrun is gone
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    assert launcher.returncode != 0, output(launcher)[-2000:]
    assert elapsed < 45, elapsed  # torchrun: monitor interval + 30 s shutdown grace, at most
    assert not left, f"workers still running after torchrun exited: {left}"
    last = latest_checkpoint(out)
    verify_checksums(last)
    step = int(last.name.split("_")[1])
    assert step >= 4
    assert train.main([str(path), *args, batch(1), f"--train.max_steps={step + 2}"]) == 0
    assert list(losses(out)) == list(range(1, step + 3))


def test_universal_state_is_deepspeeds_own_state_per_parameter(tmp_path, data_dir):
    """One process, ZeRO 0: DeepSpeed's own checkpoint holds the whole state too, indexed by
    position in the optimizer's groups (matrices first, then vectors); universal/ must hold
    the same tensors under the parameters' names."""
    path, out = config(tmp_path, data_dir, "plain")
    assert train.main([str(path), *RUN, "--train.max_steps=3", batch(1)]) == 0
    ckpt = latest_checkpoint(out)
    index = json.loads((ckpt / "universal/index.json").read_text())
    assert index["adam_step"] == 3 and index["world_size"] == 1 and index["zero_stage"] == 0
    universal = load_file(ckpt / "universal/rank00000.safetensors")
    # our own checkpoint, written by this test: trusted, so a full load is fine
    ds = torch.load(ckpt / "ds/state/mp_rank_00_model_states.pt", weights_only=False)
    # the module's state in model order; a tied weight appears there under both names
    names = [n for n in ds["module"] if n in index["params"]]
    assert sorted(names) == sorted(index["params"]) and len(ds["module"]) == len(names) + 1
    order = [n for n in names if ds["module"][n].dim() >= 2]
    order += [n for n in names if ds["module"][n].dim() < 2]
    moments = ds["optimizer"]["state"]
    assert len(moments) == len(order)
    for pid, name in enumerate(order):
        assert torch.equal(universal[f"{name}/fp32"], ds["module"][name].float()), name
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(universal[f"{name}/{kind}"], moments[pid][kind]), (name, kind)
        assert moments[pid]["step"].item() == 3


LAYOUT_CASES = [
    # (saved: world, stage, dtype), (now: world, stage, dtype), universal/ saved, expected
    ((2, 1, "fp32"), (2, 1, "fp32"), True, False),  # same layout: DeepSpeed's own files
    ((2, 1, "fp32"), (4, 1, "fp32"), True, True),
    ((2, 3, "bf16"), (1, 2, "bf16"), True, True),
    ((2, 0, "fp32"), (4, 0, "fp32"), False, False),  # stage 0: DeepSpeed's state is whole
    ((2, 0, "fp32"), (4, 0, "fp32"), True, False),
    ((1, 0, "fp32"), (2, 2, "fp32"), True, True),
    ((2, 0, "fp32"), (4, 0, "fp16"), True, "loads into ZeRO stage 1-3, or stage 0 with fp32"),
    ((2, 1, "fp32"), (1, 1, "fp32"), False, "it has no universal/ state"),
    ((2, 0, "fp32"), (2, 1, "fp32"), False, "it has no universal/ state"),
    ((2, 1, "bf16"), (1, 0, "bf16"), True, "loads into ZeRO stage 1-3, or stage 0 with fp32"),
]


@pytest.mark.parametrize("then, now, saved_universal, expected", LAYOUT_CASES)
def test_which_state_a_resume_loads(tmp_path, then, now, saved_universal, expected):
    from gpt.config import Config, ConfigError
    from gpt.train.checkpointer import needs_universal

    ckpt = tmp_path / "step_00000003"
    (ckpt / "universal").mkdir(parents=True)
    if saved_universal:
        (ckpt / "universal/index.json").write_text("{}")
    zero = {"zero_optimization": {"stage": then[1]}}
    saved_cfg = {"train": {"dtype": then[2]}, "deepspeed": zero}
    saved = {"world_size": then[0], "config": saved_cfg}
    cfg = Config()
    cfg.train.dtype, cfg.deepspeed = now[2], {"zero_optimization": {"stage": now[1]}}
    if isinstance(expected, bool):
        assert needs_universal(cfg, saved, now[0], ckpt) is expected
    else:
        with pytest.raises(ConfigError, match=expected) as err:
            needs_universal(cfg, saved, now[0], ckpt)
        assert f"resume with {then[0]} process(es)" in str(err.value)
