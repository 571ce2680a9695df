"""The attention benchmark (bench/attention.py, bench/attention_report.py): float64 reference,
the correctness gate, timing and memory, and a tiny end-to-end CPU sweep with deliberately
wrong backends."""

import csv
import json
import math

import pytest
import torch

from bench import attention as bench
from bench.attention import FIELDS, Shape, Timing
from gpt import attention
from gpt.attention import BackendUnavailable, register_attention, sdpa_attention


@pytest.fixture
def registered():
    """register_attention for the test's duration; the registry and threads are restored."""
    added, threads = [], torch.get_num_threads()

    def register(name, fn_or_error):
        def loader():
            if isinstance(fn_or_error, Exception):
                raise fn_or_error
            return fn_or_error

        register_attention(name, loader)
        added.append(name)

    yield register
    for name in added:
        attention._LOADERS.pop(name)
    torch.set_num_threads(threads)


def raising(error: Exception):
    """A backend that raises ``error`` on every call."""

    def fn(q, k, v, causal, scale):
        raise error

    return fn


def wrong_mask(q, k, v, causal, scale):
    """Ignores the causal mask: right only for full attention."""
    return sdpa_attention(q, k, v, False, scale)


class _WrongDq(torch.autograd.Function):
    """SDPA's forward; its backward with dQ scaled by 1.1."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        ctx.causal = causal
        ctx.save_for_backward(q, k, v)
        return sdpa_attention(q, k, v, causal)

    @staticmethod
    def backward(ctx, do):
        q, k, v = (x.detach().requires_grad_() for x in ctx.saved_tensors)
        with torch.enable_grad():
            dq, dk, dv = torch.autograd.grad(sdpa_attention(q, k, v, ctx.causal), (q, k, v), do)
        return 1.1 * dq, dk, dv, None


def wrong_grad(q, k, v, causal, scale):
    """Exact forward, dQ 10% too large."""
    return _WrongDq.apply(q, k, v, causal)


TINY = ["--head-dims", "16", "--tokens", "80", "--hidden", "32", "--threads", "1"]
FAST = ["--warmup", "0", "--min-reps", "2", "--budget", "0", "--no-progress"]


CASES = [  # (T, S, causal, GQA group)
    (1, 1, True, 1),
    (17, 17, True, 1),
    (33, 33, True, 1),
    (1, 1, False, 1),
    (33, 33, False, 1),
    (5, 19, False, 1),
    (5, 19, True, 1),  # causal T < S: the mask aligned bottom-right
    (1, 19, True, 3),
    (17, 17, True, 3),
]


@pytest.mark.parametrize("T,S,causal,group", CASES)
def test_reference_matches_float64_autograd(T, S, causal, group):
    """Against autograd through softmax with an explicit bottom-right mask (query i sees
    keys j <= i + S - T), K/V heads repeated per group."""
    gen = torch.Generator().manual_seed(T + S)
    q = torch.randn(2, 3 * group, T, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, S, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k.requires_grad_(), v.requires_grad_()
    do = torch.randn(2, 3 * group, T, 8, generator=gen, dtype=torch.float64)
    scores = (q @ k.repeat_interleave(group, 1).mT) * 0.3
    if causal:
        visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        scores = scores.masked_fill(~visible, -math.inf)
    out = torch.softmax(scores, dim=-1) @ v.repeat_interleave(group, 1)
    expected = (out, *torch.autograd.grad(out, (q, k, v), do))
    got = bench.reference_attention(q, k, v, do, causal, 0.3)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=name)


def test_reference_chunks_heads_alike(monkeypatch):
    """The chunking over heads (one head per chunk for long rows) changes nothing."""
    q, k, v, do = (
        torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)
    )
    whole = bench.reference_attention(q, k, v, do, True, 0.25)
    monkeypatch.setattr(bench, "REFERENCE_CHUNK_BYTES", 1)  # forces one head per chunk
    for x, y in zip(bench.reference_attention(q, k, v, do, True, 0.25), whole, strict=True):
        assert torch.equal(x, y)


def test_end_to_end_refuses_wrong_backends(tmp_path, registered):
    registered("wrong-mask", wrong_mask)
    registered("wrong-grad", wrong_grad)
    backends = ["naive", "sdpa", "sdpa-math", "triton", "wrong-mask", "wrong-grad"]
    argv = ["--backends", *backends, "--seq-lens", "16", "40", *TINY, *FAST, "--out", str(tmp_path)]
    returned = bench.main(argv)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert list(results) == [
        "command", "date", "device", "versions", "git", "env", "load_average", "wall_s",
        "settings", "timing_method", "memory_method", "backends", "fields", "results",
    ]  # fmt: skip
    assert results["command"] == "python bench/attention.py " + " ".join(argv)
    assert (tmp_path / "command.txt").read_text() == results["command"] + "\n"
    assert results["device"]["type"] == "cpu" and results["device"]["peak_tflops"] == {"fp32": None}
    assert results["versions"]["torch"] == torch.__version__
    assert len(results["load_average"]["start"]) == 3
    assert results["fields"] == FIELDS
    records = results["results"]
    assert len(records) == len(backends) * 2 * 2  # backends × T × causal/full
    assert all(list(r) == FIELDS for r in records)
    by = {(r["backend"], r["seq_len"], r["causal"]): r for r in records}

    for name in ("naive", "sdpa", "sdpa-math"):
        for T in (16, 40):
            for causal in (True, False):
                r = by[name, T, causal]
                assert r["status"] == "ok" and r["reason"] is None, r
                assert r["batch"] == 80 // T and r["heads"] == 2 and r["head_dim"] == 16
                assert max(r[e] for e in bench.ERRORS) < 1e-5
                flops = 4 * r["batch"] * 2 * T * T * 16 / (2 if causal else 1)
                for phase, factor in (("fwd", 1), ("bwd", 2.5), ("fwd_bwd", 3.5)):
                    assert r[f"{phase}_reps"] >= 2 and r[f"{phase}_ms"] > 0
                    tflops = factor * flops / (r[f"{phase}_ms"] * 1e-3) / 1e12
                    assert math.isclose(r[f"{phase}_tflops"], tflops, rel_tol=1e-9)
                    assert r[f"{phase}_pct_peak"] is None  # no peak for a CPU
                    # at least the three gradients (fp32) for a backward
                    grads = 3 * r["batch"] * 2 * T * 16 * 4
                    assert r[f"{phase}_peak_mem_bytes"] >= (grads if phase != "fwd" else 1)

    timings = FIELDS[FIELDS.index("fwd_ms") :]
    for T in (16, 40):
        masked = by["wrong-mask", T, True]
        assert masked["status"] == "wrong" and "err_out" in masked["reason"]
        assert all(masked[f] is None for f in timings), "a wrong backend must not be timed"
        assert by["wrong-mask", T, False]["status"] == "ok"  # full attention: nothing to mask
        for causal in (True, False):
            r = by["wrong-grad", T, causal]
            assert r["status"] == "wrong" and all(r[f] is None for f in timings)
            assert "err_dq" in r["reason"] and "err_out" not in r["reason"]
            assert r["err_out"] < 1e-5 and r["err_dk"] < 1e-5 and 0.05 < r["err_dq"] < 0.2
            triton = by["triton", T, causal]
            assert triton["status"] == "checked" and "interpreter" in triton["reason"]
            assert max(triton[e] for e in bench.ERRORS) < 1e-5
            assert all(triton[f] is None for f in timings)

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(row) for row in rows] == [FIELDS] * len(records)
    assert [row["status"] for row in rows] == [r["status"] for r in records]
    assert "| wrong-mask | WRONG | WRONG |" in (tmp_path / "summary.md").read_text()
    for png in ("tflops-fp32.png", "memory-fp32.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_unsupported_oom_and_skipped(tmp_path, registered):
    registered("absent", BackendUnavailable("needs a TPU"))
    registered("picky", raising(RuntimeError("No available kernel")))
    registered("hungry", raising(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    backends = ["absent", "picky", "hungry", "triton", "sdpa-cudnn"]
    argv = ["--backends", *backends, "--seq-lens", "16", "512", "--masks", "causal"]
    results = bench.main([*argv, *TINY, "--batch", "1", *FAST, "--out", str(tmp_path)])

    assert not results["backends"]["absent"]["available"]
    assert "needs a TPU" in results["backends"]["absent"]["reason"]
    assert not results["backends"]["sdpa-cudnn"]["available"]  # there is no cuDNN on a CPU
    assert "CUDNN" in results["backends"]["sdpa-cudnn"]["reason"]
    by = {(r["backend"], r["seq_len"]): r for r in results["results"]}
    assert {r["backend"] for r in results["results"]} == {"picky", "hungry", "triton"}
    assert by["picky", 16]["status"] == "unsupported"
    assert "No available kernel" in by["picky", 16]["reason"]
    assert by["hungry", 16]["status"] == "oom" and "check" in by["hungry", 16]["reason"]
    assert by["triton", 16]["status"] == "checked"
    # B·H·T² = 2·512² scores is past what the interpreter runs in reasonable time
    assert by["triton", 512]["status"] == "skipped" and by["triton", 512]["err_out"] is None


def test_bad_arguments_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--backends", "nonesuch", "--out", "unused"])
    assert exc.value.code == 2 and "sdpa-flash" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--seq-lens", "0", "--out", "unused"])
    assert exc.value.code == 2 and "--seq-lens" in capsys.readouterr().err


def test_shape_list_with_grouped_query_heads(tmp_path):
    """--shapes: each shape (one with 4 query heads on 2 K/V heads) x mask, checked against
    the float64 reference; the summary is issue 17's table, a row per shape."""
    shapes = ["--shapes", "2x4/2x16x16", "1x2x24x16", "--masks", "causal", "--threads", "1"]
    argv = [
        "--backends",
        "naive",
        "sdpa",
        "triton-packed-gqa",
        *shapes,
        *FAST,
        "--out",
        str(tmp_path),
    ]
    results = bench.main(argv)
    records = results["results"]
    assert results["settings"]["shapes"] == ["2x4/2x16x16", "1x2x24x16"]
    assert [(r["batch"], r["heads"], r["kv_heads"], r["seq_len"]) for r in records[::3]] == [
        (2, 4, 2, 16), (1, 2, 2, 24)
    ]  # fmt: skip
    by = {(r["backend"], r["seq_len"]): r for r in records}
    for T in (16, 24):
        assert by["naive", T]["status"] == by["sdpa", T]["status"] == "ok"
        assert by["triton-packed-gqa", T]["status"] == "checked"
        assert max(by["triton-packed-gqa", T][e] for e in bench.ERRORS) < 1e-5
    summary = (tmp_path / "summary.md").read_text()
    assert "| shape (B, H/H_kv, T, D) | naive | sdpa | triton-packed-gqa |" in summary
    assert "| 2, 4/2, 16, 16 |" in summary and "| 1, 2, 24, 16 |" in summary
    assert (tmp_path / "tflops-fp32.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("shape", ["4x16x4096", "4x3/2x64x64", "0x1x8x8", "axbxcxd"])
def test_bad_shapes_exit_with_status_2(shape, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", shape, "--out", "unused"])
    assert exc.value.code == 2 and "--shapes" in capsys.readouterr().err


def test_percentage_of_peak_and_peak_table(monkeypatch):
    shape = Shape(batch=2, heads=2, seq_len=32, head_dim=16, causal=True, dtype="fp32")
    inputs = [torch.randn(2, 2, 32, 16).requires_grad_(i < 3) for i in range(4)]
    ref = bench.reference_attention(*inputs, True, 0.25)
    timing = Timing(warmup=0, min_reps=2, max_reps=2, budget_s=0)
    r = bench.bench_backend(
        "sdpa", sdpa_attention, shape, inputs, ref, torch.device("cpu"), timing, 1e9
    )
    for phase in bench.PHASES:
        assert math.isclose(r[f"{phase}_pct_peak"], 100 * r[f"{phase}_tflops"] * 1e12 / 1e9)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert bench.device_peak(gpu, "bf16") == 989e12
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot undo it
    try:  # (train.py and bench/trainer.py turn TF32 on for the process: set it either way)
        torch.backends.cuda.matmul.allow_tf32 = False
        assert bench.device_peak(gpu, "fp32") == 67e12  # IEEE fp32: exact products
        torch.backends.cuda.matmul.allow_tf32 = True
        assert bench.device_peak(gpu, "fp32") == 494.5e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert bench.device_peak(torch.device("cpu"), "fp32") is None


def test_time_call_repetitions():
    calls = []
    timing = Timing(warmup=2, min_reps=5, max_reps=100, budget_s=0)
    ms, reps = bench.time_call(lambda: calls.append(1), torch.device("cpu"), timing)
    assert (reps, len(calls)) == (5, 7) and ms >= 0
    timing = Timing(warmup=0, min_reps=1, max_reps=3, budget_s=60)
    assert bench.time_call(lambda: None, torch.device("cpu"), timing)[1] == 3


def test_cpu_peak_memory_counts_live_tensors():
    def call():
        big = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, freed at return
        return big[:1024].clone()  # 4 KiB, alive after the call

    peak = bench.peak_memory(call, torch.device("cpu"))
    assert 4 << 20 <= peak < (4 << 20) + (64 << 10)
