"""The edge where DeepSpeed lives: process-group start-up, the DeepSpeed config dict (and
which [deepspeed] keys may reach it), and ``Engine``, the trainer's handle on the DeepSpeed
engine. The training loop calls only ``Engine``'s methods (a micro-step, the learning rate,
the step's health, whole parameters); nothing outside this module reads
``engine.optimizer``, overflow flags, the global gradient norm or ZeRO's gathers. (The
checkpoint format's own modules, gpt/train/checkpoint.py and gpt/train/universal.py, speak
DeepSpeed's save/load protocol on the engine ``Engine.ds``.)

One process with no launcher works too: ``init_distributed`` then fakes a world of one
(RANK=0, WORLD_SIZE=1, a free local port) so that the same code path runs everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt.config import Config, ConfigError
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


# The [deepspeed] section, by dotted key. Keys the trainer derives from its own config, and
# keys DeepSpeed would ignore or override with the engine built here, are refused: (what they
# are here, the config key to set instead). Every key deepspeed_config() writes is either
# refused here or checked in DEEPSPEED_KEYS below (tests/test_config.py keeps them in step).
DEEPSPEED_REFUSED = {
    "train_batch_size": (
        "derived from train.micro_batch_size, train.grad_accum and the world size",
        "train.global_batch_size",
    ),
    "train_micro_batch_size_per_gpu": (
        "derived from train.micro_batch_size and train.grad_accum",
        "train.micro_batch_size",
    ),
    "gradient_accumulation_steps": (
        "derived from train.micro_batch_size and train.grad_accum",
        "train.grad_accum (or train.global_batch_size)",
    ),
    "gradient_clipping": ("set by the trainer", "optim.grad_clip"),
    "optimizer": (
        "ignored: the trainer always steps its own AdamW (gpt/train/optim.py)",
        "optim.lr, optim.beta1, optim.beta2, optim.eps and optim.weight_decay",
    ),
    "scheduler": (
        "overridden: the trainer sets the learning rate at every step",
        "optim.lr, optim.warmup_steps and optim.min_lr",
    ),
    "zero_allow_untested_optimizer": ("set by the trainer (ZeRO wraps its AdamW)", "nothing"),
    "fp16.enabled": ("derived from train.dtype", "train.dtype = 'fp16'"),
    "torch_autocast": (
        "derived from train.dtype (bf16 runs under autocast unless deepspeed.bf16.enabled)",
        "train.dtype = 'bf16'",
    ),
    "amp": ("not used (precision comes from train.dtype)", "train.dtype"),
    "steps_per_print": ("set by the trainer, which logs itself", "train.log_interval"),
    "compile": ("not used (the trainer compiles the model itself)", "train.compile"),
    "checkpoint": (
        "not used (the trainer writes and resumes its own checkpoints)",
        "train.ckpt_interval and train.universal_checkpoint",
    ),
    "activation_checkpointing": (
        "ignored: the model never calls DeepSpeed's activation checkpointing",
        "train.activation_checkpointing (per block, torch.utils.checkpoint)",
    ),
    "zero_optimization.offload_optimizer": (
        "not supported: offloading needs DeepSpeed's CPU Adam and the trainer steps its AdamW",
        "more processes with deepspeed.zero_optimization.stage = 3",
    ),
    "zero_optimization.offload_param": (
        "not supported: offloading needs DeepSpeed's CPU Adam and the trainer steps its AdamW",
        "more processes with deepspeed.zero_optimization.stage = 3",
    ),
    "zero_optimization.mics_shard_size": (
        "not supported: checkpoints need ZeRO partitions over every rank (not MiCS)",
        "deepspeed.zero_optimization.stage = 3",
    ),
}


def _bool() -> tuple[str, Callable[[Any], bool]]:
    return "true or false", lambda v: isinstance(v, bool)


def _int(lo: int, hi: int | None = None) -> tuple[str, Callable[[Any], bool]]:
    rule = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    return (
        rule,
        lambda v: (
            isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)
        ),
    )


def _number(above: float) -> tuple[str, Callable[[Any], bool]]:
    return (
        f"a number > {above:g}",
        lambda v: (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > above
        ),
    )


def _choice(*names: str) -> tuple[str, Callable[[Any], bool]]:
    return f"one of {', '.join(repr(n) for n in names)}", lambda v: v in names


# Keys passed on to DeepSpeed as given, with what each must be. fp16.* only with
# train.dtype = "fp16", bf16.enabled only with train.dtype = "bf16".
DEEPSPEED_KEYS = {
    "zero_optimization.stage": _int(0, 3),
    "zero_optimization.contiguous_gradients": _bool(),
    "zero_optimization.overlap_comm": _bool(),
    "zero_optimization.reduce_scatter": _bool(),
    "zero_optimization.reduce_bucket_size": _int(1),
    "zero_optimization.allgather_partitions": _bool(),
    "zero_optimization.allgather_bucket_size": _int(1),
    "zero_optimization.round_robin_gradients": _bool(),
    "zero_optimization.sub_group_size": _int(1),
    "zero_optimization.stage3_max_live_parameters": _int(0),
    "zero_optimization.stage3_max_reuse_distance": _int(0),
    "zero_optimization.stage3_prefetch_bucket_size": _int(0),
    "zero_optimization.stage3_param_persistence_threshold": _int(0),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _bool(),
    "bf16.enabled": _bool(),
    "fp16.loss_scale": (
        "0 (dynamic) or a number > 0",
        lambda v: not isinstance(v, bool) and (v == 0 or _number(0)[1](v)),
    ),
    "fp16.initial_scale_power": _int(0, 64),
    "fp16.loss_scale_window": _int(1),
    "fp16.hysteresis": _int(1),
    "fp16.min_loss_scale": _int(1),
    "communication_data_type": _choice("fp32", "fp16", "bf16"),
    "data_types.grad_accum_dtype": _choice("fp32", "fp16", "bf16"),
    "prescale_gradients": _bool(),
    "gradient_predivide_factor": _number(0),
    "wall_clock_breakdown": _bool(),
    "memory_breakdown": _bool(),
}
DEEPSPEED_TABLES = {k.rpartition(".")[0] for k in DEEPSPEED_KEYS} - {""}


def _show(value: Any) -> str:
    """A value as TOML writes it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def check_deepspeed_section(cfg: Config) -> None:
    """ConfigError naming the key for anything in [deepspeed] the trainer would not honour:
    a key it derives, overrides or ignores (with the config key to use instead), an unknown
    key, a value of the wrong type (a ZeRO stage is an integer 0-3, never a boolean), or a
    precision section that contradicts train.dtype."""
    dtype = cfg.train.dtype

    def walk(table: dict, prefix: str) -> None:
        for name, value in table.items():
            key = f"{prefix}{name}"
            if key in DEEPSPEED_REFUSED:
                what, instead = DEEPSPEED_REFUSED[key]
                use = "remove it" if instead == "nothing" else f"remove it and set {instead}"
                raise ConfigError(f"deepspeed.{key} is {what}; {use}")
            if key in DEEPSPEED_TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"deepspeed.{key} = {_show(value)} must be a table of keys "
                        f"(e.g. --deepspeed.{key}.KEY=VALUE); valid keys: "
                        + ", ".join(k for k in DEEPSPEED_KEYS if k.startswith(key + "."))
                    )
                walk(value, key + ".")
                continue
            if key not in DEEPSPEED_KEYS:
                valid = sorted(
                    {k[len(prefix) :].split(".")[0] for k in DEEPSPEED_KEYS if k.startswith(prefix)}
                )
                section = f"[deepspeed.{prefix[:-1]}]" if prefix else "[deepspeed]"
                raise ConfigError(
                    f"deepspeed.{key} is not a key this trainer passes on to DeepSpeed; valid "
                    f"keys of {section}: {', '.join(valid)} (docs/configuration.md)"
                )
            rule, ok = DEEPSPEED_KEYS[key]
            if not ok(value):
                raise ConfigError(f"deepspeed.{key} = {_show(value)} is not valid; use {rule}")
            if key.startswith("fp16.") and dtype != "fp16":
                raise ConfigError(
                    f"deepspeed.{key} is only used with train.dtype = 'fp16' (now {dtype!r}); "
                    "remove it or set train.dtype = 'fp16'"
                )

    walk(cfg.deepspeed, "")
    if cfg.deepspeed.get("bf16", {}).get("enabled") and dtype != "bf16":
        raise ConfigError(
            f"deepspeed.bf16.enabled = true (bf16 weights) needs train.dtype = 'bf16', "
            f"got {dtype!r}; set train.dtype = 'bf16' or remove it"
        )


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


class Engine:
    """The DeepSpeed engine around the model and the GuardedAdamW it steps, behind the few
    calls the trainer makes. ``ds`` is DeepSpeed's engine (for the checkpoint protocol),
    ``optimizer`` ours (DeepSpeed may wrap it: ZeRO, bf16), ``module`` the model."""

    def __init__(self, model: torch.nn.Module, cfg: Config, world_size: int):
        self.ds, self.optimizer = build_engine(model, cfg, world_size)
        self.module = self.ds.module

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self.ds(x, y)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; DeepSpeed steps the optimizer on the
        last micro-batch of a gradient-accumulation round. The loss, not read here."""
        _, loss = self.ds(x, y)
        self.ds.backward(loss)
        self.ds.step()
        return loss

    def set_lr(self, lr: float) -> float:
        for group in self.ds.optimizer.param_groups:  # DeepSpeed's wrapper shares ours
            group["lr"] = lr
        return lr

    def step_health(self) -> tuple:
        """(skipped, grad_norm) of the optimizer step just taken, as the optimizer left them:
        device scalars from GuardedAdamW, not read here; a DeepSpeed wrapper (fp16) that
        skipped before calling it reports its own host flag. Each step's verdict is
        handed out once."""
        skipped = self.optimizer.skipped
        if skipped is None:
            skipped = float(bool(getattr(self.ds.optimizer, "overflow", False)))
        self.optimizer.skipped = None
        return skipped, self.ds.get_global_grad_norm()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def full_parameters(self):
        """Collective: a context in which every rank holds whole parameters (ZeRO-3 gathers
        them; a no-op otherwise)."""
        return full_parameters(self.ds)


def full_parameters(engine: DeepSpeedEngine):
    """Collective: under ZeRO-3 a context in which every rank holds whole parameters."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
