"""The trainer's step against a bare PyTorch loop, timed per attention backend and compile
setting.

    python bench/trainer.py CONFIG.toml [--steps 10] [--warmup 3] [--backends sdpa triton]
        [--compile false true] [--out DIR] [--section.key=value ...]

For every attention backend and torch.compile setting it builds the configured model and
DeepSpeed engine afresh (``gpt.train.trainer.Trainer``, as ``train.py CONFIG`` would), runs
``--warmup`` untimed steps (compilation happens there), then times ``--steps`` full
optimizer steps (every micro-batch's forward and backward, the gradient all-reduce and the
update; no evaluation, logging or checkpointing). Beside each it times a ``bare`` loop: the
same model, precision, micro-batch and accumulation with ``torch.optim.AdamW`` (fused) and no
DeepSpeed, the forty lines a user could write instead; the engine's row reports
``vs_bare``, its throughput over the bare loop's (``vs_bare_cpu``: the same in process CPU
time, steadier than the wall clock on a shared CPU machine). It reports the median step
time, tokens per second and MFU (only where the device's peak is known), prints a table and
writes ``bench.json`` into ``--out`` (default: the config's ``train.out_dir``; no checkpoint
is written there). ``bench/trainer_summary.py`` takes the medians over repeated runs.

The config and ``--section.key=value`` overrides are checked exactly as ``train.py`` checks
them (exit status 2 naming the key). Under torchrun every rank runs the engine's rows; the
bare loop runs in one process only. (This was once ``train.py CONFIG --bench.steps=N``;
train.py now refuses ``bench.*`` settings with a message naming this script.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt import __version__
from gpt.attention import attention_status, canonical_attention_name
from gpt.cli.train import checked_config
from gpt.config import Config
from gpt.config_io import config_from_argv
from gpt.data.loader import TokenLoader
from gpt.fileio import write_atomic
from gpt.sdpa import run_sdpa_report
from gpt.train import dist
from gpt.train.engine import init_distributed, precision, world_size_from_env
from gpt.train.finetune import build_model
from gpt.train.metrics import flops_per_token, peak_flops
from gpt.train.optim import lr_at, param_groups
from gpt.train.trainer import Trainer

PROG = "bench/trainer.py"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """What to time: this script's own flags (the rest of the command line is the config)."""

    steps: int = 10  # timed optimizer steps per row
    warmup: int = 3  # untimed steps before them (compilation happens here)
    backends: tuple[str, ...] = ()  # attention backends; empty: every registered one
    compile: tuple[bool, ...] = (False, True)  # torch.compile settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_to_run(settings: Settings) -> list[tuple[str, str | None]]:
    """(name, reason it cannot run here or None) for each backend of ``settings.backends``,
    or for every registered one when it is empty (names checked by ``parse_args``)."""
    status = attention_status()
    return [(n, status[n]) for n in settings.backends or list(status)]


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
    cfg: Config, manifests: dict[str, dict], device: torch.device, settings: Settings
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

    times = [timed(step, device) for _ in range(settings.warmup + settings.steps)]
    return times[settings.warmup :], trainer.flops_per_token


def time_bare(
    cfg: Config, manifests: dict[str, dict], device: torch.device, settings: Settings
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
    steps = iter(range(settings.warmup + settings.steps))

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

    times = [timed(step, device) for _ in range(settings.warmup + settings.steps)]
    return times[settings.warmup :], flops_per_token(model, cfg.model.block_size)


def run_benchmark(
    cfg: Config,
    manifests: dict[str, dict],
    device: torch.device,
    settings: Settings,
    out: Path,
    argv: list[str],
) -> int:
    """Time every (backend, compile) pair, through the engine and as a bare loop; the exit
    status (0: errors of a backend are reported in its row)."""
    t, m = cfg.train, cfg.model
    backends = backends_to_run(settings)
    world = dist.world_size()
    tokens_per_step = cfg.global_batch(world) * m.block_size
    peak = peak_flops(device, t.dtype)
    results = []
    for name, unavailable in backends:
        for compiled in settings.compile:
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
                rows.append({**row, **measure(timer, run_cfg, manifests, device, settings)})
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
        report(cfg, settings, results, device, world, tokens_per_step, out, argv)
    return 0


def measure(timer, cfg: Config, manifests: dict, device: torch.device, settings: Settings) -> dict:
    """One row's status and, when it ran, its median step time and FLOPs per token."""
    try:
        times, flops_token = timer(cfg, manifests, device, settings)
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


def report(cfg, settings, results, device, world, tokens_per_step, out, argv) -> None:
    print(
        f"\nbenchmark: {settings.steps} timed steps after {settings.warmup} warm-up, "
        f"{tokens_per_step:,} tokens per step, {world} process(es) on {device}, "
        f"{cfg.train.dtype} ({precision(cfg)})"
    )
    print(
        f"{'loop':<8}{'attention':<19}{'compile':<9}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}"
        f"{'vs bare':>9}{'CPU ms':>10}{'vs bare':>9}"
    )
    for r in results:
        head = f"{r['loop']:<8}{r['attention']:<19}{r['compile']!s:<9}"
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
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # which kernel the sdpa rows' F.scaled_dot_product_attention ran (gpt/sdpa.py)
    ran_sdpa = any(r["attention"] == "sdpa" and r["status"] == "ok" for r in results)
    sdpa_model = dataclasses.replace(cfg.model, attention="sdpa")
    summary = {
        "command": " ".join([PROG, *argv]),
        "device": device_name,
        "world_size": world,
        "dtype": cfg.train.dtype,
        "precision": precision(cfg),
        "tokens_per_step": tokens_per_step,
        "model": dataclasses.asdict(cfg.model),
        "train": {k: getattr(cfg.train, k) for k in ("micro_batch_size", "grad_accum", "compile")},
        "bench": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(settings).items()
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpt": __version__,
        },
        "sdpa": run_sdpa_report(sdpa_model, cfg.train.dtype, device) if ran_sdpa else None,
        "results": results,
    }
    if summary["sdpa"]:
        print(f"sdpa ran {summary['sdpa']['kernel']} (priority {summary['sdpa']['priority']})")
    write_atomic(out / "bench.json", json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'bench.json'}")


def parse_args(argv: list[str]) -> tuple[Settings, Path | None, list[str]]:
    """This script's flags, and the rest: the config file and its ``--section.key=value``
    overrides, left to ``config_from_argv`` as train.py leaves them."""
    p = argparse.ArgumentParser(
        prog=f"python {PROG}",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="The other arguments are train.py's: CONFIG.toml [--section.key=value ...].",
        allow_abbrev=False,  # --s... must never swallow a --section.key=value override
    )
    defaults = Settings()
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=defaults.warmup,
                   help="untimed steps before them (compilation happens here)")  # fmt: skip
    p.add_argument("--backends", nargs="+", metavar="NAME", default=[],
                   help="attention backends to compare (default: every registered one; "
                   "those that cannot run here are listed)")  # fmt: skip
    p.add_argument("--compile", nargs="+", choices=["false", "true"], default=["false", "true"],
                   help="torch.compile settings to compare")  # fmt: skip
    p.add_argument("--out", type=Path, help="where bench.json goes (default: train.out_dir)")
    args, rest = p.parse_known_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1; got {args.steps}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0; got {args.warmup}")
    names = list(attention_status())
    args.backends = [canonical_attention_name(n) for n in args.backends]  # old names too
    if unknown := [n for n in args.backends if n not in names]:
        p.error(f"--backends: unknown attention backend(s) {', '.join(unknown)}; valid: "
                f"{', '.join(names)}")  # fmt: skip
    if bad := [a for a in rest if a.startswith("-") and not a.startswith("--")]:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        backends=tuple(dict.fromkeys(args.backends)),
        compile=tuple(dict.fromkeys(c == "true" for c in args.compile)),
    )
    return settings, args.out, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings, out, rest = parse_args(argv)
    _, cfg = config_from_argv(rest, PROG)  # exits 2 on a malformed config
    world = world_size_from_env()
    try:
        manifests, _ = checked_config(cfg, world)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError too
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    _, _, device = init_distributed(cfg.train.dist_timeout)
    # as train.py: fp32 matmuls on TF32 tensor cores, MFU against the TF32 peak
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return run_benchmark(cfg, manifests, device, settings, out or Path(cfg.train.out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
