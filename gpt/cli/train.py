"""Pretrain a GPT: ``python train.py CONFIG.toml [--section.key=value ...]``.

Runs as one process (CPU or one GPU) with no launcher, or under ``deepspeed`` / ``torchrun``
with N processes; always through a DeepSpeed engine (gpt/engine.py). Running the same
command again resumes from the latest complete checkpoint in ``train.out_dir``.

Exit status: 0 finished; 2 bad configuration; 3 aborted after too many consecutive
non-finite steps; 128 + signal number (130 SIGINT, 143 SIGTERM) when stopped by a signal,
after saving a checkpoint.
"""

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt import GPT, __version__
from gpt.config import Config, ConfigError, config_from_argv, save_config
from gpt.data.loader import TokenLoader
from gpt.data.shards import read_manifest
from gpt.data.tokenizer import get_tokenizer
from gpt.generate import encode_prompt, sample_texts
from gpt.train.checkpoint import (
    full_parameters,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gpt.train.engine import (
    build_engine,
    check_batch,
    init_distributed,
    train_step,
    world_size_from_env,
)
from gpt.train.metrics import MetricsLog, flops_per_token, peak_flops, start_wandb
from gpt.train.optim import lr_at
from gpt.train.throughput import run_benchmark

NONFINITE_EXIT = 3


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop checks it (all ranks agreeing) after each step."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def check_resume(cfg: Config, saved: dict, manifest: dict, world: int, ckpt: Path) -> None:
    """Refuse, before the first step, to resume what would not continue the same run."""
    changed = [
        f"model.{k}: {v!r} -> {getattr(cfg.model, k)!r}"
        for k, v in saved["config"]["model"].items()
        if k not in ("attention", "dropout") and getattr(cfg.model, k) != v
    ]
    if changed:
        raise ConfigError(
            f"{ckpt}: cannot resume with a different model shape: {'; '.join(changed)}"
        )
    if saved["data_fingerprint"] != data_fingerprint(manifest):
        raise ConfigError(
            f"{ckpt}: cannot resume: the data set changed (data.dir {cfg.data.dir} now holds "
            "different shards than when the checkpoint was written)"
        )
    zero = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    if saved["world_size"] != world and zero > 0:
        raise ConfigError(
            f"{ckpt}: saved by {saved['world_size']} processes with ZeRO stage {zero}, resumed "
            f"by {world}: ZeRO partitions optimizer state per process, so resume with "
            f"{saved['world_size']} processes (or train with zero stage 0)"
        )


def data_fingerprint(manifest: dict) -> list:
    return sorted(
        [s["file"], s["crc32"]] for split in manifest["splits"].values() for s in split["shards"]
    )


@torch.no_grad()
def evaluate(engine, loaders: dict[str, TokenLoader], steps: int, device) -> dict[str, float]:
    engine.eval()
    losses = {}
    for name, loader in loaders.items():
        loader.reset()  # the same batches at every evaluation
        total = sum(
            engine(*(t.to(device) for t in loader.next_batch()))[1].item() for _ in range(steps)
        )
        (mean,) = all_reduce_sum([total / steps / dist.get_world_size()], device)
        losses["val_loss" if name == "val" else f"val_loss/{name}"] = mean
    engine.train()
    return losses


@torch.no_grad()
def eval_samples(engine, tokenizer, cfg: Config) -> dict[str, str]:
    """A continuation of each of ``train.sample_prompts`` (same seed every time, so that
    evaluations differ only by the weights). Every rank samples: under ZeRO-3 gathering
    the parameters is a collective."""
    model, t = engine.module, cfg.train
    model.eval()
    texts = {}
    with full_parameters(engine):
        for prompt in t.sample_prompts:
            ids, _ = encode_prompt(tokenizer, prompt, model.cfg.block_size)
            (texts[prompt],) = sample_texts(
                model, tokenizer, ids, 1, t.sample_tokens, temperature=0.8, top_k=200, seed=t.seed
            )
    model.train()
    return texts


def main(argv: list[str]) -> int:
    path, cfg = config_from_argv(argv, "train.py")
    try:
        global_batch = check_batch(cfg, world_size_from_env())
        manifest = read_manifest(Path(cfg.data.dir))
    except ValueError as err:  # ConfigError is a ValueError too
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    # fp32 matmuls on TF32 tensor cores (as nanoGPT); MFU is then against the TF32 peak
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t, m = cfg.train, cfg.model
    out_dir = Path(t.out_dir)
    stop = StopFlag()

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    if t.init_from == "scratch":
        model = GPT(m)
    else:
        model = GPT.from_pretrained(t.init_from, attention=m.attention, dropout=m.dropout)
        cfg.model = m = model.cfg
    if manifest["n_vocab"] > m.vocab_size:
        print(
            f"train.py: error: {cfg.data.dir} uses {manifest['encoding']} with "
            f"{manifest['n_vocab']} tokens, more than model.vocab_size = {m.vocab_size}",
            file=sys.stderr,
        )
        return 2
    if cfg.bench.steps:  # benchmark mode: each timed configuration builds its own model
        flops_token = flops_per_token(model, m.block_size)
        del model
        return run_benchmark(cfg, rank, world, device, argv, flops_token)
    model.to(device)
    engine, optimizer = build_engine(model, cfg, world)
    loader = TokenLoader(
        cfg.data.dir,
        "train",
        m.block_size,
        t.micro_batch_size,
        t.grad_accum,
        rank,
        world,
        t.seed,
        cfg.data.mode,
    )
    val_dirs = {"val": cfg.data.dir, **cfg.data.extra_val} if t.eval_interval else {}
    val_loaders = {
        name: TokenLoader(
            d, "val", m.block_size, t.micro_batch_size, 1, rank, world, t.seed, "sequential"
        )
        for name, d in val_dirs.items()
    }

    step, tokens = 0, 0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer.json").read_text())
        try:
            check_resume(cfg, saved, manifest, world, ckpt)
        except ConfigError as err:
            print(f"train.py: error: {err}", file=sys.stderr)
            return 2
        saved = load_checkpoint(engine, ckpt)
        step, tokens = saved["step"], saved["tokens"]
        loader.load_state_dict(saved["loader"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.toml")
        print(
            f"{'resuming from ' + str(ckpt) if ckpt else 'starting'}: "
            f"{model.num_params():,} parameters, {world} process(es) on {device}, "
            f"global batch {global_batch} x {m.block_size} tokens"
        )
    wandb_run = start_wandb(
        t.wandb and rank == 0, out_dir, t.wandb_project, dataclasses.asdict(cfg)
    )
    log = MetricsLog(out_dir, rank == 0, step, wandb_run)
    peak = peak_flops(device, t.dtype)
    flops_token = flops_per_token(model, m.block_size)
    tokenizer = get_tokenizer(manifest["encoding"]) if t.sample_tokens else None

    def trainer_state() -> dict:
        import deepspeed

        return {
            "step": step,
            "tokens": tokens,
            "loader": loader.state_dict(),
            "world_size": world,
            "config": dataclasses.asdict(cfg),
            "data_fingerprint": data_fingerprint(manifest),
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "gpt": __version__,
            },
        }

    def checkpoint() -> None:
        save_checkpoint(
            engine, out_dir, step, trainer_state(), t.keep_checkpoints, manifest["encoding"]
        )

    nonfinite_run, last_saved = 0, step
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, leave=False)
    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        optimizer.overflow = False
        loss_sum = train_step(engine, loader, t.grad_accum, device)
        loss_total, stop_votes = all_reduce_sum([loss_sum, float(stop.signum != 0)], device)
        step += 1
        tokens += global_batch * m.block_size
        step_s = time.perf_counter() - t0
        mean_loss = loss_total / (t.grad_accum * world)
        grad_norm = engine.get_global_grad_norm()
        # ZeRO and fp16 wrappers may skip before our optimizer runs; they set their own flag
        overflow = optimizer.overflow or bool(getattr(engine.optimizer, "overflow", False))
        skipped = overflow or not math.isfinite(mean_loss)
        nonfinite_run = nonfinite_run + 1 if skipped else 0
        record = {
            "step": step,
            "tokens": tokens,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": global_batch * m.block_size / step_s,
            "step_ms": 1000 * step_s,
        }
        if peak:
            record["mfu"] = flops_token * record["tokens_per_s"] / peak
        if skipped:
            record["skipped"] = True
        bar.update(1)
        if rank == 0 and (step % t.log_interval == 0 or skipped or step == t.max_steps):
            bar.write(
                f"step {step:6d} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm "
                f"{record['grad_norm'] or float('nan'):.3f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {record['step_ms']:.0f} ms"
                + (" | SKIPPED: non-finite" if skipped else "")
            )
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
            record.update(evaluate(engine, val_loaders, t.eval_steps, device))
            if tokenizer is not None and t.sample_prompts:
                record["samples"] = eval_samples(engine, tokenizer, cfg)
            if rank == 0:
                bar.write(
                    "  "
                    + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val"))
                )
                for prompt, text in record.get("samples", {}).items():
                    bar.write("  sample: " + (prompt + text).replace("\n", "\n    "))
        if step % t.log_interval == 0 or skipped or "val_loss" in record or step == t.max_steps:
            log.write(record)
        if nonfinite_run >= t.max_nonfinite_steps:
            if rank == 0:
                print(
                    f"train.py: aborting: {nonfinite_run} consecutive non-finite steps (loss "
                    f"{mean_loss}, grad norm {grad_norm}) up to step {step}; they left the "
                    f"parameters unchanged. The last complete checkpoint is "
                    f"{latest_checkpoint(out_dir)}; lower optim.lr or check the data, then run "
                    f"the same command to resume.",
                    file=sys.stderr,
                )
            return NONFINITE_EXIT
        if stop_votes or step % t.ckpt_interval == 0 or step == t.max_steps:
            checkpoint()  # skipped steps left the parameters as they were: safe to save
            last_saved = step
        if stop_votes:
            if rank == 0:
                print(
                    f"train.py: stopped by a signal after step {step}; checkpoint "
                    f"{latest_checkpoint(out_dir)} saved; run the same command to resume",
                    file=sys.stderr,
                )
            return 128 + (stop.signum or signal.SIGTERM)
    bar.close()
    if last_saved != step:
        checkpoint()
    if rank == 0:
        print(f"done: {step} steps, {tokens:,} tokens; checkpoints in {out_dir / 'checkpoints'}")
    return 0
