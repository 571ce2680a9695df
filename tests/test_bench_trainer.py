"""The trainer's step against a bare PyTorch loop (bench/trainer.py), in one CPU process on a
tiny model: the rows it times, the bare loop beside the engine, what it writes (bench.json,
never a checkpoint), and its errors."""

import json

import pytest
from runs import config

from bench import trainer as bench_trainer

FAST = ["--steps", "2", "--warmup", "1", "--compile", "false"]


def test_times_each_backend_beside_a_bare_loop_and_writes_no_checkpoint(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    argv = [str(path), *FAST, "--backends", "naive", "sdpa", "--train.grad_accum=2"]
    assert bench_trainer.main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["command"] == "bench/trainer.py " + " ".join(argv)
    assert report["bench"] == {
        "steps": 2, "warmup": 1, "backends": ["naive", "sdpa"], "compile": [False]
    }  # fmt: skip
    rows = {(r["loop"], r["attention"]): r for r in report["results"]}
    assert list(rows) == [("engine", "naive"), ("bare", "naive"), ("engine", "sdpa"),
                          ("bare", "sdpa")]  # fmt: skip
    assert all(r["status"] == "ok" and r["compile"] is False for r in rows.values())
    # 4 sequences a micro-batch x 2 micro-batches x 16 tokens
    assert report["tokens_per_step"] == 4 * 2 * 16 and report["precision"] == "fp32"
    for r in rows.values():
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_ms"] * 1e3)
        assert r["mfu"] is None  # no peak is known for a CPU: no made-up MFU
    for name in ("naive", "sdpa"):
        engine, bare = rows["engine", name], rows["bare", name]
        assert engine["vs_bare"] == pytest.approx(bare["step_ms"] / engine["step_ms"])
        assert engine["vs_bare_cpu"] == pytest.approx(bare["step_cpu_ms"] / engine["step_cpu_ms"])
        assert "vs_bare" not in bare
    printed = capsys.readouterr().out
    assert "bare" in printed and f"{rows['engine', 'sdpa']['vs_bare']:.2f}x" in printed
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "config.toml").exists()  # not a training run
    # the kernel the sdpa rows ran (gpt/sdpa.py): on a CPU, PyTorch's flash-style kernel
    assert report["sdpa"]["kernel"] == "flash" and report["sdpa"]["priority"][0] == "flash"
    assert "sdpa ran flash" in printed


def test_warm_up_steps_run_but_are_not_timed(tmp_path, data_dir, monkeypatch):
    """Each loop runs warm-up + timed steps; only the timed ones make the row: warm-up steps
    here take 10 s by the (replaced) clock, timed ones 2 ms wall and 1 ms CPU."""
    calls = []

    def timed(step, device):
        step()
        calls.append(1)
        return (10.0, 10.0) if len(calls) % 3 else (0.002, 0.001)  # 2 warm-up, 1 timed

    monkeypatch.setattr(bench_trainer, "timed", timed)
    path, out = config(tmp_path, data_dir)
    argv = [str(path), "--steps", "1", "--warmup", "2", "--compile", "false", "--backends", "sdpa"]
    assert bench_trainer.main(argv) == 0
    assert len(calls) == 2 * 3  # engine and bare, 3 steps each
    for r in json.loads((out / "bench.json").read_text())["results"]:
        assert (r["step_ms"], r["step_ms_min"], r["step_cpu_ms"]) == pytest.approx((2, 2, 1))
        assert r["tokens_per_s"] == pytest.approx(8 * 16 / 0.002)


def test_out_puts_the_report_elsewhere(tmp_path, data_dir):
    path, out = config(tmp_path, data_dir)
    argv = [str(path), *FAST, "--backends", "sdpa", "--out", str(tmp_path / "timings"),
            '--model.sdpa_kernels=["math"]']  # fmt: skip
    assert bench_trainer.main(argv) == 0
    report = json.loads((tmp_path / "timings" / "bench.json").read_text())
    assert [r["loop"] for r in report["results"]] == ["engine", "bare"]
    assert report["sdpa"]["kernel"] == "math" and report["sdpa"]["priority"] == ["math"]
    assert not out.exists()


def test_an_unavailable_backend_is_a_row_not_a_failure(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(
        bench_trainer, "attention_status", lambda: {"sdpa": None, "absent": "needs a TPU"}
    )
    path, out = config(tmp_path, data_dir)
    assert bench_trainer.main([str(path), *FAST, "--backends", "absent"]) == 0
    rows = json.loads((out / "bench.json").read_text())["results"]
    assert [(r["loop"], r["status"], r["reason"]) for r in rows] == [
        ("engine", "unavailable", "needs a TPU"), ("bare", "unavailable", "needs a TPU")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backends", "fast"], "--backends: unknown attention backend(s) fast; valid: naive"),
        (["--steps", "0"], "--steps must be at least 1; got 0"),
        (["--warmup", "-1"], "--warmup must be at least 0; got -1"),
        (["--compile", "maybe"], "argument --compile: invalid choice: 'maybe'"),
        (["-x"], "unrecognized arguments: -x"),
    ],
)
def test_bad_flags_exit_with_status_2(tmp_path, data_dir, capsys, flags, message):
    path, _ = config(tmp_path, data_dir)
    with pytest.raises(SystemExit) as exc:
        bench_trainer.main([str(path), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_config_is_checked_as_train_py_checks_it(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    with pytest.raises(SystemExit) as exc:
        bench_trainer.main([str(path), *FAST, "--train.no_such_key=1"])
    assert exc.value.code == 2 and "unknown key train.no_such_key" in capsys.readouterr().err
    assert bench_trainer.main([str(path), *FAST, "--train.micro_batch_size=0"]) == 2
    assert "bench/trainer.py: error: train.micro_batch_size" in capsys.readouterr().err
    assert not out.exists()
