"""``python train.py CONFIG.toml [--section.key=value ...]``: parse, validate, build, run.

Every check of the configuration against itself, the world size and the prepared data runs
here, before a process group starts or a model is built; a bad value exits with status 2 and
a message naming the key. Exit statuses are listed in train.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gpt.config import Config
from gpt.config_io import config_from_argv, save_config
from gpt.data.run_data import check_run_data, read_manifests
from gpt.lora import count_trainable
from gpt.memory import available_memory, check_training_memory, format_bytes
from gpt.run import remove_partial_checkpoints, write_run_info
from gpt.sdpa import run_sdpa_report
from gpt.train import checkpoint as ckpt
from gpt.train import dist
from gpt.train.engine import init_distributed, world_size_from_env
from gpt.train.finetune import init_model_config
from gpt.train.lock import RunLock, RunLocked
from gpt.train.trainer import CHECKPOINT_WRITE_EXIT, Trainer


def checked_config(cfg: Config, world: int) -> tuple[dict[str, dict], str]:
    """Every check of ``cfg`` against itself, the world size, the prepared data and the
    memory, before a process group starts (``bench/trainer.py`` runs the same): the data
    manifests by role and a line on the memory a process needs. ValueError (ConfigError) or
    FileNotFoundError naming the key."""
    if cfg.train.init_from != "scratch":  # fine-tuning: the checkpoint's shape
        cfg.model = init_model_config(cfg)
    cfg.validate(world)  # ranges and combinations
    manifests = read_manifests(cfg)
    check_run_data(cfg, manifests)
    free, where = available_memory()
    estimate = check_training_memory(cfg, world, (free, where))  # before any allocation
    memory = f"memory: about {estimate.summary()} per process; {format_bytes(free)} {where}"
    return manifests, memory


def main(argv: list[str]) -> int:
    _, cfg = config_from_argv(argv, "train.py")  # exits 2 on a malformed config
    world = world_size_from_env()
    try:
        manifests, memory = checked_config(cfg, world)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError too
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(memory)
    lock = RunLock(cfg.train.out_dir)
    if os.environ.get("RANK", "0") == "0":
        # rank 0 takes the run directory before the process group starts and DeepSpeed builds
        # its op (a minute or more on a fresh installation), so a busy directory is refused at
        # once; a launcher then stops the other ranks
        try:
            lock.acquire()
        except RunLocked as err:
            print(f"train.py: error: {err}", file=sys.stderr)
            return 2
    try:
        _, _, device = init_distributed(cfg.train.dist_timeout)  # for the process's life
        # fp32 matmuls on TF32 tensor cores (as nanoGPT); MFU is then against the TF32 peak
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return train(cfg, manifests, device, argv, lock)
    finally:
        lock.release()


def train(
    cfg: Config, manifests: dict[str, dict], device: torch.device, argv: list[str], lock: RunLock
) -> int:
    """Resume or start in the run directory rank 0 holds, and run the loop; an exit status."""
    out_dir = Path(cfg.train.out_dir)
    if dist.is_main():
        if lock.previous:
            print(
                f"train.py: taking over {out_dir} from a job that did not exit cleanly "
                f"({lock.previous})",
                file=sys.stderr,
            )
        for partial in remove_partial_checkpoints(out_dir):
            print(f"train.py: removed the partial checkpoint {partial}", file=sys.stderr)
    try:
        sdpa = run_sdpa_report(cfg.model, cfg.train.dtype, device)  # which kernel runs, if any
        trainer = Trainer(cfg, manifests, device)  # ValueError: a damaged data shard
        resumed = trainer.resume()  # ConfigError: no checkpoint this run can continue
    except ValueError as err:
        if dist.is_main():
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if dist.is_main():
        save_config(cfg, out_dir / "config.toml")
        params, trainable = trainer.model.num_params(), count_trainable(trainer.model)
        batch = cfg.global_batch(dist.world_size())
        write_run_info(
            out_dir, ["train.py", *argv], params=params, trainable_params=trainable, sdpa=sdpa
        )
        if sdpa:
            print(f"attention: sdpa runs {sdpa['kernel']} (priority {', '.join(sdpa['priority'])})")
        print(
            f"{'resuming from ' + str(resumed) if resumed else 'starting'}: "
            f"{params:,} parameters ({trainable:,} trainable), {dist.world_size()} process(es) "
            f"on {device}, global batch {batch} x {cfg.model.block_size} = "
            f"{batch * cfg.model.block_size:,} tokens per optimizer step (micro-batch "
            f"{cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} x "
            f"{dist.world_size()} process(es))"
        )
    try:
        return trainer.fit()
    except ckpt.CheckpointWriteError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return CHECKPOINT_WRITE_EXIT
