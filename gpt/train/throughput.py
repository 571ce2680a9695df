"""The trainer's benchmark mode: ``python train.py CONFIG --bench.steps=N``.

For every attention backend and torch.compile setting it builds the configured model and
DeepSpeed engine afresh, runs ``bench.warmup`` untimed steps (compilation happens there),
then times ``bench.steps`` full optimizer steps (every micro-batch's forward and backward,
the gradient all-reduce and the update; no evaluation, logging or checkpointing). It
reports the median step time, tokens per second and MFU (only where the device's peak is
known), prints a table and writes ``train.out_dir/bench.json``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpt import GPT, __version__
from gpt.attention import attention_status
from gpt.config import Config, ConfigError
from gpt.data.loader import TokenLoader
from gpt.train.engine import build_engine, train_step
from gpt.train.metrics import peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_to_run(cfg: Config) -> list[tuple[str, str | None]]:
    """(name, reason it cannot run here or None) for each backend named in bench.backends,
    or for every registered one when the list is empty; ConfigError for unknown names."""
    status = attention_status()
    names = cfg.bench.backends or list(status)
    unknown = [n for n in names if n not in status]
    if unknown:
        raise ConfigError(
            f"bench.backends: unknown attention backend(s) {', '.join(unknown)}; "
            f"valid: {', '.join(status)}"
        )
    return [(n, status[n]) for n in names]


def time_one(cfg: Config, world: int, device: torch.device, loader: TokenLoader) -> list[float]:
    """Seconds per optimizer step, warm-up steps excluded."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    engine, _ = build_engine(model, cfg, world)
    times = []
    for _ in range(cfg.bench.warmup + cfg.bench.steps):
        _sync(device)
        t0 = time.perf_counter()
        train_step(engine, loader, t.grad_accum, device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[cfg.bench.warmup :]


def run_benchmark(
    cfg: Config, rank: int, world: int, device: torch.device, argv: list[str], flops_token: float
) -> int:
    """Time every (backend, compile) pair; ``flops_token`` is the model's FLOPs per token
    (for MFU). Returns the process exit status (0, or 2 for a bad bench section)."""
    b, t, m = cfg.bench, cfg.train, cfg.model
    try:
        if b.steps < 1 or b.warmup < 0:
            raise ConfigError(
                f"bench.steps must be >= 1 and bench.warmup >= 0, got bench.steps = {b.steps}, "
                f"bench.warmup = {b.warmup}"
            )
        backends = backends_to_run(cfg)
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    loader = TokenLoader(
        cfg.data.dir, "train", m.block_size, t.micro_batch_size, t.grad_accum, rank, world, t.seed
    )
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * m.block_size
    peak = peak_flops(device, t.dtype)
    results = []
    for name, unavailable in backends:
        for compiled in b.compile:
            row = {"attention": name, "compile": compiled}
            if unavailable:
                results.append({**row, "status": "unavailable", "reason": unavailable})
                continue
            run_cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(m, attention=name),
                train=dataclasses.replace(t, compile=compiled),
            )
            try:
                times = time_one(run_cfg, world, device, loader)
            except torch.cuda.OutOfMemoryError:
                results.append({**row, "status": "oom"})
                torch.cuda.empty_cache()
                continue
            except Exception as err:  # a backend or compiler that fails is reported, not fatal
                results.append({**row, "status": "error", "reason": f"{type(err).__name__}: {err}"})
                continue
            step_s = statistics.median(times)
            if world > 1:  # the slowest rank sets the pace
                slowest = torch.tensor([step_s], dtype=torch.float64, device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                step_s = slowest.item()
            results.append(
                {
                    **row,
                    "status": "ok",
                    "step_ms": 1000 * step_s,
                    "step_ms_min": 1000 * min(times),
                    "tokens_per_s": tokens_per_step / step_s,
                    "mfu": flops_token * tokens_per_step / step_s / peak if peak else None,
                }
            )
    if rank == 0:
        report(cfg, results, device, world, tokens_per_step, argv)
    return 0


def report(cfg, results, device, world, tokens_per_step, argv) -> None:
    print(
        f"\nbenchmark: {cfg.bench.steps} timed steps after {cfg.bench.warmup} warm-up, "
        f"{tokens_per_step:,} tokens per step, {world} process(es) on {device}, {cfg.train.dtype}"
    )
    print(f"{'attention':<12}{'compile':<9}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['attention']:<12}{r['compile']!s:<9}  {r['status']}: {r.get('reason', '')}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['attention']:<12}{r['compile']!s:<9}{r['step_ms']:>10.1f}"
            f"{r['tokens_per_s']:>12,.0f}{mfu:>8}"
        )
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {
        "command": " ".join(["train.py", *argv]),
        "device": device_name,
        "world_size": world,
        "dtype": cfg.train.dtype,
        "tokens_per_step": tokens_per_step,
        "model": dataclasses.asdict(cfg.model),
        "bench": dataclasses.asdict(cfg.bench),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpt": __version__,
        },
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'bench.json'}")
