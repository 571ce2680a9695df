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

from gpt.config import Config, ConfigError, config_from_argv, save_config
from gpt.data.shards import read_manifest
from gpt.lora import count_trainable
from gpt.memory import available_memory, check_training_memory, format_bytes
from gpt.train import checkpoint as ckpt
from gpt.train import dist
from gpt.train.engine import init_distributed, world_size_from_env
from gpt.train.finetune import init_model_config
from gpt.train.lock import RunLock, RunLocked
from gpt.train.throughput import run_benchmark
from gpt.train.trainer import CHECKPOINT_WRITE_EXIT, Trainer


def read_manifests(cfg: Config) -> dict[str, dict]:
    """The manifest of every data set by its role (``Config.data_sets``): "train"
    (data.dir), "replay" and "extra_val/<name>", so no extra validation set can stand in for
    another; ConfigError naming the key when one cannot be read."""
    manifests = {}
    for role, key, directory in cfg.data_sets():
        try:
            manifests[role] = read_manifest(Path(directory))
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    return manifests


def main(argv: list[str]) -> int:
    _, cfg = config_from_argv(argv, "train.py")  # exits 2 on a malformed config
    world = world_size_from_env()
    try:
        if cfg.train.init_from != "scratch":  # fine-tuning: the checkpoint's shape
            cfg.model = init_model_config(cfg)
        cfg.validate(world)  # ranges and combinations
        manifests = read_manifests(cfg)
        cfg.validate_data(manifests)
        free, where = available_memory()
        estimate = check_training_memory(cfg, world, (free, where))  # before any allocation
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError too
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"memory: about {estimate.summary()} per process; {format_bytes(free)} {where}")
    lock = RunLock(cfg.train.out_dir)
    if not cfg.bench.steps and os.environ.get("RANK", "0") == "0":
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
        if cfg.bench.steps:
            return run_benchmark(cfg, manifests, device, argv)
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
        for partial in ckpt.remove_partial_checkpoints(out_dir):
            print(f"train.py: removed the partial checkpoint {partial}", file=sys.stderr)
    try:
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
        ckpt.write_run_info(out_dir, ["train.py", *argv], params=params, trainable_params=trainable)
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
