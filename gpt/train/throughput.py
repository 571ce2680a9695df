"""The trainer's benchmark mode: ``python train.py CONFIG --bench.steps=N``.

For every attention backend and torch.compile setting it builds the configured model and
DeepSpeed engine afresh, runs ``bench.warmup`` untimed steps (compilation happens there),
then times ``bench.steps`` full optimizer steps (every micro-batch's forward and backward,
the gradient all-reduce and the update; no evaluation, logging or checkpointing). Beside
each it times a ``bare`` loop: the same model, precision, micro-batch and accumulation with
``torch.optim.AdamW`` (fused) and no DeepSpeed, the forty lines a user could write instead;
the engine's row reports ``vs_bare``, its throughput over the bare loop's (``vs_bare_cpu``:
the same in process CPU time, steadier than the wall clock on a shared CPU machine). It
reports the median step time, tokens per second and MFU (only where the device's peak is
known), prints a table and writes ``train.out_dir/bench.json``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt import __version__
from gpt.attention import attention_status
from gpt.config import Config
from gpt.data.loader import TokenLoader
from gpt.fileio import write_atomic
from gpt.train import dist
from gpt.train.engine import precision
from gpt.train.finetune import build_model
from gpt.train.metrics import flops_per_token, peak_flops
from gpt.train.optim import lr_at, param_groups
from gpt.train.trainer import Trainer

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_to_run(cfg: Config) -> list[tuple[str, str | None]]:
    """(name, reason it cannot run here or None) for each backend named in bench.backends,
    or for every registered one when the list is empty (names checked by Config.validate)."""
    status = attention_status()
    return [(n, status[n]) for n in cfg.bench.backends or list(status)]


def timed(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``step()``, the device drained before and after.
    (CPU time is the work done on the host: on a shared CPU-only machine it is less
    disturbed by other processes than the wall clock.)"""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def time_one(
    cfg: Config, manifests: dict[str, dict], device: torch.device
) -> tuple[list[tuple[float, float]], float]:
    """(wall, CPU) seconds of each optimizer step of the trainer's own step
    (``Trainer.train_step``), warm-up steps excluded, and the model's FLOPs per token.
    Evaluation, logging and checkpoints are off."""
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, eval_interval=0, sample_tokens=0, wandb=False)
    )
    trainer = Trainer(cfg, manifests, device)

    def step() -> None:
        trainer.set_lr()
        trainer.train_step()

    times = [timed(step, device) for _ in range(cfg.bench.warmup + cfg.bench.steps)]
    return times[cfg.bench.warmup :], trainer.flops_per_token


def time_bare(
    cfg: Config, manifests: dict[str, dict], device: torch.device
) -> tuple[list[tuple[float, float]], float]:
    """``time_one`` for a bare PyTorch loop (one process, no DeepSpeed): the same model and
    batches, AdamW (fused) with the same groups, schedule and clipping, the forward under
    autocast for bf16 and fp16 (fp16 with a GradScaler), gradients accumulated as the mean
    over micro-batches."""
    t, o = cfg.train, cfg.optim
    model = build_model(cfg).to(device)
    if t.compile:
        model.compile()
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=device.type in ("cuda", "cpu"),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=t.dtype == "fp16")
    loader = TokenLoader(
        cfg.data.dir,
        "train",
        block_size=cfg.model.block_size,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        seed=t.seed,
        mode=cfg.data.mode,
    )
    pin = device.type == "cuda"
    steps = iter(range(cfg.bench.warmup + cfg.bench.steps))

    def step() -> None:
        lr = lr_at(next(steps), o, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(t.grad_accum):
            x, y = (b.pin_memory() if pin else b for b in loader.next_batch())
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            with torch.autocast(device.type, AUTOCAST.get(t.dtype), enabled=t.dtype != "fp32"):
                _, loss = model(x, y)
            scaler.scale(loss / t.grad_accum).backward()
        if o.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    times = [timed(step, device) for _ in range(cfg.bench.warmup + cfg.bench.steps)]
    return times[cfg.bench.warmup :], flops_per_token(model, cfg.model.block_size)


def run_benchmark(
    cfg: Config, manifests: dict[str, dict], device: torch.device, argv: list[str]
) -> int:
    """Time every (backend, compile) pair, through the engine and as a bare loop; the exit
    status (0: errors of a backend are reported in its row)."""
    b, t, m = cfg.bench, cfg.train, cfg.model
    backends = backends_to_run(cfg)
    world = dist.world_size()
    tokens_per_step = cfg.global_batch(world) * m.block_size
    peak = peak_flops(device, t.dtype)
    results = []
    for name, unavailable in backends:
        for compiled in b.compile:
            run_cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(m, attention=name),
                train=dataclasses.replace(t, compile=compiled),
            )
            rows = []
            for loop, timer in (("engine", time_one), ("bare", time_bare)):
                row = {"loop": loop, "attention": name, "compile": compiled}
                if unavailable:
                    rows.append({**row, "status": "unavailable", "reason": unavailable})
                    continue
                if loop == "bare" and world > 1:
                    reason = "the bare loop runs in one process (no gradient all-reduce)"
                    rows.append({**row, "status": "skipped", "reason": reason})
                    continue
                rows.append({**row, **measure(timer, run_cfg, manifests, device)})
            for r in rows:
                if r["status"] == "ok":
                    r["step_ms"] = 1000 * slowest_rank(r.pop("step_s"), device, r["loop"])
                    r["tokens_per_s"] = 1000 * tokens_per_step / r["step_ms"]
                    r["mfu"] = r.pop("flops_token") * r["tokens_per_s"] / peak if peak else None
            engine, bare = rows
            if engine["status"] == bare["status"] == "ok":
                engine["vs_bare"] = bare["step_ms"] / engine["step_ms"]
                engine["vs_bare_cpu"] = bare["step_cpu_ms"] / engine["step_cpu_ms"]
            results += rows
    if dist.is_main():
        report(cfg, results, device, world, tokens_per_step, argv)
    return 0


def measure(timer, cfg: Config, manifests: dict[str, dict], device: torch.device) -> dict:
    """One row's status and, when it ran, its median step time and FLOPs per token."""
    try:
        times, flops_token = timer(cfg, manifests, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom"}
    except Exception as err:  # a backend or compiler that fails is reported, not fatal
        return {"status": "error", "reason": f"{type(err).__name__}: {err}"}
    wall, cpu = zip(*times, strict=True)
    return {
        "status": "ok",
        "step_s": statistics.median(wall),
        "step_ms_min": 1000 * min(wall),
        "step_cpu_ms": 1000 * statistics.median(cpu),
        "flops_token": flops_token,
    }


def slowest_rank(step_s: float, device: torch.device, loop: str) -> float:
    """The engine's step time of the slowest rank (it sets the pace); the bare loop runs on
    rank 0 only."""
    if dist.world_size() == 1 or loop == "bare":
        return step_s
    slowest = torch.tensor([step_s], dtype=torch.float64, device=device)
    return dist.all_reduce(slowest, "max").item()


def report(cfg, results, device, world, tokens_per_step, argv) -> None:
    print(
        f"\nbenchmark: {cfg.bench.steps} timed steps after {cfg.bench.warmup} warm-up, "
        f"{tokens_per_step:,} tokens per step, {world} process(es) on {device}, "
        f"{cfg.train.dtype} ({precision(cfg)})"
    )
    print(
        f"{'loop':<8}{'attention':<12}{'compile':<9}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}"
        f"{'vs bare':>9}{'CPU ms':>10}{'vs bare':>9}"
    )
    for r in results:
        head = f"{r['loop']:<8}{r['attention']:<12}{r['compile']!s:<9}"
        if r["status"] != "ok":
            print(f"{head}  {r['status']}: {r.get('reason', '')}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['vs_bare']:.2f}x" if "vs_bare" in r else ""
        cpu_ratio = f"{r['vs_bare_cpu']:.2f}x" if "vs_bare_cpu" in r else ""
        print(
            f"{head}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{mfu:>8}{ratio:>9}"
            f"{r['step_cpu_ms']:>10.1f}{cpu_ratio:>9}"
        )
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {
        "command": " ".join(["train.py", *argv]),
        "device": device_name,
        "world_size": world,
        "dtype": cfg.train.dtype,
        "precision": precision(cfg),
        "tokens_per_step": tokens_per_step,
        "model": dataclasses.asdict(cfg.model),
        "train": {k: getattr(cfg.train, k) for k in ("micro_batch_size", "grad_accum", "compile")},
        "bench": dataclasses.asdict(cfg.bench),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpt": __version__,
        },
        "results": results,
    }
    write_atomic(out / "bench.json", json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'bench.json'}")
