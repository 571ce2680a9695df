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
import time
from pathlib import Path

import torch

from gpt import __version__
from gpt.attention import attention_status
from gpt.config import Config
from gpt.train import dist
from gpt.train.metrics import peak_flops
from gpt.train.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_to_run(cfg: Config) -> list[tuple[str, str | None]]:
    """(name, reason it cannot run here or None) for each backend named in bench.backends,
    or for every registered one when the list is empty (names checked by Config.validate)."""
    status = attention_status()
    return [(n, status[n]) for n in cfg.bench.backends or list(status)]


def time_one(
    cfg: Config, manifests: dict[str, dict], device: torch.device
) -> tuple[list[float], float]:
    """Seconds per optimizer step of the trainer's own step (``Trainer.train_step``), warm-up
    steps excluded, and the model's FLOPs per token. Evaluation, logging and checkpoints
    are off."""
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, eval_interval=0, sample_tokens=0, wandb=False)
    )
    trainer = Trainer(cfg, manifests, device)
    times = []
    for _ in range(cfg.bench.warmup + cfg.bench.steps):
        _sync(device)
        t0 = time.perf_counter()
        trainer.set_lr()
        trainer.train_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[cfg.bench.warmup :], trainer.flops_per_token


def run_benchmark(
    cfg: Config, manifests: dict[str, dict], device: torch.device, argv: list[str]
) -> int:
    """Time every (backend, compile) pair; the exit status (0: errors of a backend are
    reported in its row)."""
    b, t, m = cfg.bench, cfg.train, cfg.model
    backends = backends_to_run(cfg)
    world = dist.world_size()
    tokens_per_step = cfg.global_batch(world) * m.block_size
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
                times, flops_token = time_one(run_cfg, manifests, device)
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
                step_s = dist.all_reduce(slowest, "max").item()
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
    if dist.is_main():
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
