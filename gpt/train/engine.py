"""The edge where DeepSpeed lives: process-group start-up, the DeepSpeed config dict, and the
engine. The training loop only calls ``engine(x, y)``, ``engine.backward``, ``engine.step``.

One process with no launcher works too: ``init_distributed`` then fakes a world of one
(RANK=0, WORLD_SIZE=1, a free local port) so that the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import torch

from gpt.config import Config
from gpt.train.optim import GuardedAdamW, param_groups

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def world_size_from_env() -> int:
    """The world size a launcher announced (1 without one), known before the process group
    starts: the config is validated against it before any work."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, nccl on GPU); returns (rank, world, device).

    ``timeout_s`` bounds how long a collective waits for the other ranks: when one dies or
    hangs, the others fail after at most this long instead of waiting forever (NCCL's
    watchdog aborts the process; gloo raises). A launcher usually notices a dead rank first
    and stops the rest (see docs/cluster.md)."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    from gpt.train.dist import set_timeout

    set_timeout(timeout_s)
    if "RANK" not in os.environ:  # a plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Our config in DeepSpeed's terms, then the [deepspeed] section on top (pass-through)."""
    t, o = cfg.train, cfg.optim
    zero_stage = cfg.zero_stage
    ds = {
        "train_batch_size": cfg.global_batch(world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # fp32 without ZeRO: GuardedAdamW clips; everywhere else DeepSpeed's optimizer does
        "gradient_clipping": o.grad_clip if (t.dtype != "fp32" or zero_stage > 0) else 0.0,
        "zero_optimization": {"stage": zero_stage},
        # ZeRO wraps GuardedAdamW (an AdamW with a skip guard) rather than its own Adam
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def build_engine(
    model: torch.nn.Module, cfg: Config, world_size: int
) -> tuple[DeepSpeedEngine, GuardedAdamW]:
    """(engine, optimizer): the DeepSpeed engine around ``model`` and our GuardedAdamW,
    which DeepSpeed may wrap (ZeRO, bf16) but which makes every skip decision. With
    ``train.compile`` the engine compiles the model in place (``nn.Module.compile``): the
    training graph; evaluation runs uncompiled (``gpt.eval.validation.eager``)."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size)
    o = cfg.optim
    fp32_plain = cfg.train.dtype == "fp32" and ds["zero_optimization"]["stage"] == 0
    optimizer = GuardedAdamW(
        param_groups(model, o.weight_decay),
        clip=o.grad_clip if fp32_plain else 0.0,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if cfg.train.compile:
        engine.compile()
    return engine, optimizer
