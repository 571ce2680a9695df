"""The edge where DeepSpeed lives: process-group start-up, the DeepSpeed config dict, and the
engine. The training loop only calls ``engine(x, y)``, ``engine.backward``, ``engine.step``.

One process with no launcher works too: ``init_distributed`` then fakes a world of one
(RANK=0, WORLD_SIZE=1, a free local port) so that the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
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


def use_own_extensions_dir() -> None:
    """DeepSpeed compiles its CPU communication op just in time into TORCH_EXTENSIONS_DIR
    (default ~/.cache/torch_extensions): shared by two installations, each rebuilds it (1-2.5
    min) whenever the other ran. Unless the user chose a directory, the build stays with this
    installation (under sys.prefix, i.e. .venv/torch_extensions) where that is writable."""
    own = Path(sys.prefix) / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(own)


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, nccl on GPU); returns (rank, world, device).

    ``timeout_s`` bounds how long a collective waits for the other ranks: when one dies or
    hangs, the others fail after at most this long instead of waiting forever (NCCL's
    watchdog aborts the process; gloo raises). A launcher usually notices a dead rank first
    and stops the rest (see docs/cluster.md)."""
    import datetime

    use_own_extensions_dir()
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


def precision(cfg: Config) -> str:
    """How ``train.dtype`` is carried out (docs/performance.md compares them):

    - "fp32": fp32 weights and arithmetic (TF32 matmuls on GPUs).
    - "autocast" (bf16, the default): fp32 weights, the forward under ``torch.autocast`` to
      bf16 (DeepSpeed's ``torch_autocast`` section), GuardedAdamW's fused step on the fp32
      weights: nanoGPT's recipe, with no wrapper between DeepSpeed and the optimizer.
    - "deepspeed-bf16" (bf16 with ``deepspeed.bf16.enabled = true``): bf16 weights, an fp32
      master copy and DeepSpeed's optimizer wrapper; half the weight memory, but a slower
      step (gradient-norm and overflow checks read back per step) at ZeRO 0.
    - "fp16": DeepSpeed's fp16 with dynamic loss scaling.
    """
    t = cfg.train
    if t.dtype == "bf16":
        return "deepspeed-bf16" if cfg.deepspeed.get("bf16", {}).get("enabled") else "autocast"
    return t.dtype


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Our config in DeepSpeed's terms, then the [deepspeed] section on top (pass-through)."""
    t, o = cfg.train, cfg.optim
    zero_stage = cfg.zero_stage
    mode = precision(cfg)
    ds = {
        "train_batch_size": cfg.global_batch(world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # GuardedAdamW clips where it steps the whole fp32 weights, without a host read;
        # elsewhere DeepSpeed's ZeRO or precision wrapper clips (and reads the norm back)
        "gradient_clipping": 0.0 if guard_clips(cfg) else o.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # ZeRO wraps GuardedAdamW (an AdamW with a skip guard) rather than its own Adam
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": mode == "deepspeed-bf16"},
        "fp16": {"enabled": mode == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # DeepSpeed wraps the module's forward in torch.autocast itself (an autocast around
        # the engine would be switched off inside it)
        "torch_autocast": {"enabled": mode == "autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def guard_clips(cfg: Config) -> bool:
    """Whether GuardedAdamW clips the gradient norm: where it steps the whole fp32 weights
    (no ZeRO, no DeepSpeed precision wrapper), without reading the norm back."""
    return precision(cfg) in ("fp32", "autocast") and cfg.zero_stage == 0


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
    optimizer = GuardedAdamW(
        param_groups(model, o.weight_decay),
        clip=o.grad_clip if guard_clips(cfg) else 0.0,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if world_size == 1 and cfg.zero_stage == 0:
        # nothing to average over; DeepSpeed would still flatten every gradient into a buffer,
        # "reduce" it and copy it back, each step (profiled: the engine's largest overhead
        # over a bare loop on small models)
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()
    return engine, optimizer
