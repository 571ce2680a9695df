"""Attention kernel benchmark: check every backend against float64, then time it.

    python bench/attention.py                # small sweep on the CPU, full sweep on a GPU
    python bench/attention.py --full --backends sdpa-flash triton --dtypes bf16
    python bench/attention.py --shapes 4x16x4096x128 4x32/8x4096x128 --masks causal

Sweeps backends (the registry's `naive`, `sdpa`, `triton` and every other registered name,
plus each of PyTorch's SDPA kernels forced on its own: `sdpa-flash`, `sdpa-efficient`,
`sdpa-cudnn`, `sdpa-math`, where the device has it) × sequence length T × head dimension D ×
causal/full × dtype. As in the FlashAttention papers (Dao et al. 2022, arXiv:2205.14135;
Dao 2023, arXiv:2307.08691) batch × T is fixed (16k tokens) and so is the hidden size
heads × D (2048), so every point does the same work per token. Or ``--shapes``: a list of
``BxHxTxD`` (``BxH/H_kvxTxD`` for grouped-query attention) × causal/full × dtype.

For each shape, one set of random inputs q, k, v, dO and their float64 reference output
and gradients (explicit formulas, `reference_attention`). Each backend then:

1. is *checked*: one forward and backward on those inputs; the relative errors
   ‖x − ref‖ / ‖ref‖ of O, dQ, dK and dV must be within the dtype's tolerance, or the
   backend is reported `wrong` and not timed;
2. is *timed*: forward, backward (on a retained graph) and forward + backward, each the
   median of many calls after warm-up: CUDA events on a GPU, a wall clock on the CPU
   (whose kernels return only when done). TFLOP/s counts 4·B·H·T²·D for the forward
   (two matmuls of 2·T²·D each per head), halved when causal, and 2.5x that for the
   backward (five matmuls against two), as the FlashAttention papers do;
3. has its *peak memory per call* measured in one more, untimed call: on a GPU
   `torch.cuda.max_memory_allocated` over what was allocated before the call; on the CPU
   the peak of torch's CPU allocator from the profiler's allocation events (same meaning:
   bytes of tensors alive at the peak, beyond those alive before the call).

Out of memory is recorded as status `oom`, a kernel that refuses the shape or dtype as
`unsupported`. Results go to `--out` (default `bench/results/<device>-<date>/`):
results.json (every record plus device, versions, command, load average), results.csv,
command.txt, summary.md and plots (`bench/attention_report.py`).

A tool of this repository, not of the installed package: it imports ``gpt`` (the registry,
the kernels) and is never imported by it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` as a namespace: this file is run as a script

from bench.attention_report import (  # noqa: E402
    device_slug,
    environment,
    summary_markdown,
    write_results,
)
from gpt.attention import (  # noqa: E402
    AttentionFn,
    attention_names,
    canonical_attention_name,
    get_attention,
    sdpa_attention,
)
from gpt.kernels.warmup import parse_shape  # noqa: E402  (the warm-up reads the same shapes)

PROG = "python bench/attention.py"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative error ‖x − ref‖ / ‖ref‖ allowed for O, dQ, dK, dV: about 20 units of roundoff
# (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3); correct kernels measure 1-2 units on the CPU.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
SDPA_KERNELS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
PHASES = ("fwd", "bwd", "fwd_bwd")
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # multiples of the forward's FLOPs
# Triton's interpreter runs each program in Python (~15 µs per score on 2 cores): it skips
# shapes with more scores B·H·T² than this, which would take minutes.
INTERPRET_MAX_SCORES = 2**17
INTERPRETED = ("triton", "triton-packed-gqa")  # Triton kernels: the interpreter runs them on a CPU
REFERENCE_CHUNK_BYTES = 1 << 30  # float64 score matrices per chunk of heads
SWEEPS = {  # tokens = batch × T, hidden = heads × D
    "full": dict(seq_lens=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128],
                 dtypes=["fp16", "bf16"], tokens=16384, hidden=2048),
    "small": dict(seq_lens=[128, 256, 512, 1024], head_dims=[32, 64],
                  dtypes=["fp32"], tokens=1024, hidden=256),
}  # fmt: skip
ERRORS = ("err_out", "err_dq", "err_dk", "err_dv")  # relative errors of O, dQ, dK, dV
FIELDS = [  # every record has exactly these keys (results.csv columns, in order)
    "backend", "dtype", "batch", "heads", "kv_heads", "seq_len", "head_dim", "causal", "status",
    "reason", "tolerance", *ERRORS,
    *(f"{p}_{m}" for m in ("ms", "reps", "tflops", "pct_peak", "peak_mem_bytes") for p in PHASES),
]  # fmt: skip
TIMINGS = FIELDS[FIELDS.index("fwd_ms") :]
SETTINGS = ("seq_lens", "head_dims", "dtypes", "masks", "tokens", "hidden", "batch", "heads",
            "shapes", "seed")  # fmt: skip
POSITIVE = ("seq_lens", "head_dims", "tokens", "hidden", "batch", "heads", "max_reps", "threads")
TIMING_METHOD = {"cuda": "CUDA events", "cpu": "wall clock (time.perf_counter)"}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated before the call",
    "cpu": "peak bytes held by torch's CPU allocator (torch.profiler memory events) minus "
    "those held before the call",
}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    dtype: str
    kv_heads: int = 0  # K/V heads (grouped-query attention); 0: as many as query heads

    def __post_init__(self):
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)

    def forward_flops(self) -> float:
        flops = 4.0 * self.batch * self.heads * self.seq_len**2 * self.head_dim
        return flops / 2 if self.causal else flops


@dataclass
class Timing:
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float  # time a phase until min_reps calls *and* this many seconds


def sweep_shapes(args: argparse.Namespace) -> list[Shape]:
    """The grid of shapes; batch = tokens // T and heads = hidden // D unless fixed; or the
    list given by --shapes."""
    if args.shapes:
        return [
            Shape(B, H, T, D, mask == "causal", dtype, kv_heads=H_kv)
            for dtype in args.dtypes for mask in args.masks
            for B, H, H_kv, T, D in map(parse_shape, args.shapes)
        ]  # fmt: skip
    return [
        Shape(args.batch or max(1, args.tokens // T), args.heads or max(1, args.hidden // D),
              T, D, mask == "causal", dtype)
        for dtype in args.dtypes for D in args.head_dims for mask in args.masks
        for T in args.seq_lens
    ]  # fmt: skip


def reference_attention(q, k, v, do, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """Float64 (O, dQ, dK, dV) from the explicit formulas, cast back to q's dtype.

    O = P V with P = softmax(scale · Q Kᵀ + mask); dV = Pᵀ dO; dP = dO Vᵀ;
    dS = P ∘ (dP − rowsum(dO ∘ O)); dQ = scale · dS K; dK = scale · dSᵀ Q.
    The causal mask is aligned bottom-right (query i sees keys <= i + S - T). With
    grouped-query attention each K/V head is repeated for its query heads and its dK, dV
    are the sums over them. Computed over chunks of the B·H heads so that a chunk's three
    (T, S) float64 matrices stay under REFERENCE_CHUNK_BYTES (unless one head alone is
    larger).
    """
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    k, v = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
    flat = [x.reshape(B * H, -1, D) for x in (q, k, v, do)]  # (B·H, T or S, D)
    results = [torch.empty_like(flat[i]) for i in (0, 0, 1, 2)]  # like q, q, k, v
    chunk = max(1, REFERENCE_CHUNK_BYTES // (3 * T * S * 8))
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    for i in range(0, B * H, chunk):
        q64, k64, v64, do64 = (x[i : i + chunk].double() for x in flat)
        s = (q64 @ k64.mT) * scale  # (n, T, S)
        if causal:
            s.masked_fill_(future, -math.inf)
        p = torch.softmax(s, dim=-1)
        del s
        o = p @ v64  # (n, T, D)
        ds = do64 @ v64.mT  # dP, (n, T, S)
        ds.sub_((do64 * o).sum(-1, keepdim=True)).mul_(p)  # dS, in place
        values = (o, ds @ k64 * scale, ds.mT @ q64 * scale, p.mT @ do64)
        for out, value in zip(results, values, strict=True):
            out[i : i + chunk] = value
    o, dq, dk, dv = (x.reshape(B, H, -1, D) for x in results)
    if group > 1:  # (B, H, S, D) -> (B, H_kv, S, D): sum over each K/V head's query heads
        dk, dv = (x.view(B, H_kv, group, S, D).sum(2) for x in (dk, dv))
    return o, dq, dk, dv


def relative_error(x: Tensor, ref: Tensor) -> float:
    err = ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def _sdpa_with(kernel: SDPBackend) -> AttentionFn:
    def attention(q, k, v, causal, scale):
        with sdpa_kernel([kernel]):
            return sdpa_attention(q, k, v, causal, scale)

    return attention


def resolve_backends(names: list[str], device: torch.device) -> tuple[dict, dict]:
    """(functions of the usable names, {name: None or why it cannot run here})."""
    fns, reasons = {}, {}
    for name in names:
        try:
            fns[name] = _probe_sdpa(name, device) if name in SDPA_KERNELS else get_attention(name)
            reasons[name] = None
        except ValueError as err:
            reasons[name] = str(err)
    return fns, reasons


def _probe_sdpa(name: str, device: torch.device) -> AttentionFn:
    """The SDPA kernel ``name`` if it runs on a shape that all of them support."""
    fn = _sdpa_with(SDPA_KERNELS[name])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.zeros(1, 1, 16, 64, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(x, x, x, True, None)
        except RuntimeError as err:
            why = f"PyTorch has no {SDPA_KERNELS[name].name} kernel for {device.type} tensors"
            raise ValueError(f"{why} ({_explain(err, caught)})") from None
    return fn


def _explain(err: Exception, caught: list) -> str:
    """An exception's first line and the warnings PyTorch gave with it (SDPA says there why
    a kernel refused a shape), shortened to fit a CSV cell."""
    lines = [f"{type(err).__name__}: {err}"] + [str(w.message) for w in caught[:3]]
    return "; ".join(line.strip().splitlines()[0][:200] for line in lines)


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()  # the CUDA and CPU allocators' messages
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in msg or (
        "can't allocate memory" in msg
    )  # fmt: skip


def time_call(call: Callable[[], object], device: torch.device, timing: Timing) -> tuple:
    """(median milliseconds, calls timed) of ``call`` after ``timing.warmup`` calls."""
    for _ in range(timing.warmup):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < timing.max_reps and (
        len(times) < timing.min_reps or time.perf_counter() - started < timing.budget_s
    ):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:  # CPU kernels return when done: a wall clock around the call times the call
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints two lines per session."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(call: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensors alive at the peak of one call, beyond those alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
        del result
    # one event per allocation (+bytes) and free (-bytes) by torch's CPU allocator
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    alive = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        alive += event.nbytes()
        peak = max(peak, alive)
    return peak


def blank_record(backend: str, shape: Shape, **values) -> dict:
    record = dict.fromkeys(FIELDS)
    record.update(asdict(shape), backend=backend, tolerance=TOLERANCE[shape.dtype], **values)
    return record


def bench_backend(name, fn, shape, inputs, ref, device, timing, peak) -> dict:
    """One record: check ``fn`` against ``ref``; if right, time it and measure its memory.
    ``peak`` is the device's peak FLOP/s for the dtype, or None."""
    q, k, v, do = inputs
    interpreted = name in INTERPRETED and device.type == "cpu"
    if interpreted and shape.batch * shape.heads * shape.seq_len**2 > INTERPRET_MAX_SCORES:
        why = f"Triton interpreter: B·H·T² > {INTERPRET_MAX_SCORES} scores take minutes"
        return blank_record(name, shape, status="skipped", reason=why)
    record, stage = blank_record(name, shape), "check"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = fn(q, k, v, shape.causal, None)
                got = (out, *torch.autograd.grad(out, (q, k, v), do))
            except (RuntimeError, ValueError, NotImplementedError) as err:
                if _is_oom(err):
                    raise
                return blank_record(name, shape, status="unsupported", reason=_explain(err, caught))
        record.update(
            {key: relative_error(x, r) for key, x, r in zip(ERRORS, got, ref, strict=True)}
        )
        del out, got
        tol = record["tolerance"]
        if bad := [f"{key} {record[key]:.2e}" for key in ERRORS if not record[key] <= tol]:
            record.update(status="wrong", reason=f"{', '.join(bad)} > tolerance {tol:g}")
            return record
        if interpreted:
            why = "Triton interpreter: checked only; a time would time the interpreter"
            record.update(status="checked", reason=why)
            return record
        for stage in PHASES:
            call = _phase_call(stage, fn, shape, q, k, v, do)
            ms, reps = time_call(call, device, timing)
            tflops = shape.forward_flops() * FLOPS_FACTOR[stage] / (ms * 1e-3) / 1e12
            record[f"{stage}_ms"], record[f"{stage}_reps"] = ms, reps
            record[f"{stage}_tflops"] = tflops
            record[f"{stage}_pct_peak"] = 100 * tflops * 1e12 / peak if peak else None
            record[f"{stage}_peak_mem_bytes"] = peak_memory(call, device)
            del call
        record["status"] = "ok"
    except Exception as err:  # a broken backend must not end a long sweep
        record.update(dict.fromkeys(TIMINGS))
        if _is_oom(err):
            record.update(status="oom", reason=f"out of memory in {stage}")
        else:
            record.update(status="error", reason=f"{stage}: {_explain(err, [])}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def _phase_call(phase: str, fn, shape: Shape, q, k, v, do) -> Callable[[], object]:
    if phase == "fwd":  # with autograd recording, as in training
        return lambda: fn(q, k, v, shape.causal, None)
    if phase == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(q, k, v, shape.causal, None), (q, k, v), do)
    graph = fn(q, k, v, shape.causal, None)  # the backward alone, on one retained graph
    return lambda: torch.autograd.grad(graph, (q, k, v), do, retain_graph=True)


def run_sweep(shapes, fns, device, timing, seed: int = 0, progress: bool = True) -> list[dict]:
    """Every (shape, backend) record; one set of inputs and one reference per shape."""
    from tqdm import tqdm

    records = []
    bar = tqdm(total=len(shapes) * len(fns), disable=not progress, unit="run", leave=False)
    for shape in shapes:
        gen = torch.Generator(device).manual_seed(seed)
        q_dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
        kv_dims = (shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim)
        try:
            dims = (q_dims, kv_dims, kv_dims, q_dims)  # q, k, v, dO
            inputs = [torch.randn(d, generator=gen, device=device) for d in dims]
            inputs = [x.to(DTYPES[shape.dtype]).requires_grad_(i < 3) for i, x in enumerate(inputs)]
            ref = reference_attention(*inputs, shape.causal, 1.0 / math.sqrt(shape.head_dim))
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            inputs = ref = None
            oom_message = (str(err).strip().splitlines() or [""])[0][:200]  # which allocation
            if device.type == "cuda":
                torch.cuda.empty_cache()
        peak = device_peak(device, shape.dtype)
        for name, fn in fns.items():
            bar.set_description(f"{name} T={shape.seq_len} D={shape.head_dim} {shape.dtype}")
            if ref is None:
                why = f"out of memory for the inputs or the reference: {oom_message}"
                records.append(blank_record(name, shape, status="oom", reason=why))
            else:
                records.append(bench_backend(name, fn, shape, inputs, ref, device, timing, peak))
            bar.update()
        del inputs, ref
    bar.close()
    return records


def device_peak(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s from gpt.metrics' table; fp32 means IEEE fp32 unless TF32 is enabled."""
    from gpt.train.metrics import peak_flops

    tf32 = torch.backends.cuda.matmul.allow_tf32
    return peak_flops(device, "fp32_ieee" if dtype == "fp32" and not tf32 else dtype)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full sweep (default with CUDA)")
    size.add_argument("--small", action="store_true", help="the small sweep (default on CPU)")
    p.add_argument("--backends", nargs="+", help="names to run (default: all usable here)")
    p.add_argument("--seq-lens", nargs="+", type=int, help="sequence lengths T")
    p.add_argument("--head-dims", nargs="+", type=int, help="head dimensions D")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="input dtypes")
    p.add_argument("--masks", nargs="+", choices=["causal", "full"], default=["causal", "full"])
    p.add_argument("--tokens", type=int, help="batch × T (batch = tokens // T)")
    p.add_argument("--hidden", type=int, help="heads × D (heads = hidden // D)")
    p.add_argument("--batch", type=int, help="a fixed batch size instead of tokens // T")
    p.add_argument("--heads", type=int, help="a fixed number of heads instead of hidden // D")
    p.add_argument(
        "--shapes",
        nargs="+",
        metavar="BxHxTxD",
        help="explicit shapes instead of the grid, e.g. 4x16x4096x128 4x32/8x4096x128",
    )
    p.add_argument("--warmup", type=int, help="untimed calls before timing (GPU 5, CPU 1)")
    p.add_argument("--min-reps", type=int, help="timed calls at least (GPU 10, CPU 5)")
    p.add_argument("--max-reps", type=int, default=100, help="timed calls at most")
    p.add_argument("--budget", type=float, help="seconds per phase (GPU 0.2, CPU 0.25)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="default: bench/results/<device>-<date>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    valid = attention_names() + list(SDPA_KERNELS)
    args.backends = [canonical_attention_name(n) for n in args.backends or valid]  # old names
    if unknown := [n for n in args.backends if n not in valid]:
        p.error(f"unknown backend(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    full = args.full or (args.device.type == "cuda" and not args.small)
    for key, value in SWEEPS["full" if full else "small"].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    for text in args.shapes or []:
        try:
            parse_shape(text)
        except ValueError as err:
            p.error(f"--shapes: {err}")
    for key in POSITIVE:
        values = getattr(args, key)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1; got {values}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, gpu = args.device, args.device.type == "cuda"
    if not gpu:  # Triton's interpreter; must be set before the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = Timing(
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        min_reps=args.min_reps or (10 if gpu else 5),
        max_reps=args.max_reps,
        budget_s=args.budget if args.budget is not None else (0.2 if gpu else 0.25),
    )
    fns, reasons = resolve_backends(args.backends, device)
    for name, why in reasons.items():
        if why is not None:
            print(f"{name}: unavailable here ({why})", file=sys.stderr)
    command = shlex.join(sys.orig_argv if argv is None else [*PROG.split(), *argv])
    date, load_start, started = (
        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        os.getloadavg(),
        time.perf_counter(),
    )
    records = run_sweep(sweep_shapes(args), fns, device, timing, args.seed, not args.no_progress)
    peaks = {d: (p / 1e12 if (p := device_peak(device, d)) else None) for d in args.dtypes}
    settings = {key: getattr(args, key) for key in SETTINGS} | {
        "timing": asdict(timing),
        "tolerance": TOLERANCE,
        "interpret_max_scores": INTERPRET_MAX_SCORES,
    }
    results = {
        "command": command,
        "date": date,  # of the start
        **environment(device, peaks),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "wall_s": time.perf_counter() - started,
        "settings": settings,
        "timing_method": TIMING_METHOD[device.type],
        "memory_method": MEMORY_METHOD[device.type],
        "backends": {n: {"available": why is None, "reason": why} for n, why in reasons.items()},
        "fields": FIELDS,
        "results": records,
    }
    out = args.out or Path("bench/results") / f"{device_slug(device)}-{date[:10]}"
    write_results(results, out)
    print(summary_markdown(results))
    print(f"wrote {out}/ in {results['wall_s']:.0f} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
