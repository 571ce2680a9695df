"""AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, a guard that skips
non-finite steps, and the learning-rate schedule (linear warmup, cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gpt.config import OptimConfig
from gpt.train import dist


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr
    over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``, then ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never biases or norm gains (dim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose step is skipped, on every rank together, when any gradient it sees is
    NaN or infinite: the parameters, moments and step count stay unchanged.

    The decision never leaves the device: the global gradient norm is finite exactly when
    every gradient is, its "not finite" flag is all-reduced (MAX) across ranks (under ZeRO
    each rank sees only its partition), and the fused AdamW kernel skips the update when the
    flag is set (``found_inf``, the mechanism of torch's GradScaler). After a step,
    ``skipped`` (1.0 or 0.0) and ``_global_grad_norm`` (before clipping; DeepSpeed reports it
    as ``engine.get_global_grad_norm()``) are device scalars, read only when logged.
    ``overflow`` stays False: DeepSpeed reads it as a host bool, which would synchronise.
    (A norm above ~1e38 overflows float32 and counts as non-finite, as it should.)

    ``clip`` > 0 makes it clip the global gradient norm itself, where DeepSpeed hands it
    the whole fp32 weights (no ZeRO, no DeepSpeed precision wrapper): DeepSpeed's clipping
    reads the norm back to the host. (Under ZeRO 1-2 it cannot: DeepSpeed steps it one
    parameter group at a time, each group's gradients made just before its step.)"""

    def __init__(self, params, clip: float = 0.0, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.clip = clip
        self.overflow = False
        self.skipped: torch.Tensor | None = None
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return super().step(closure)
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        found_inf = dist.all_reduce((~torch.isfinite(norm)).float(), "max")
        self.skipped, self._global_grad_norm, self.found_inf = found_inf, norm, found_inf
        return super().step(closure)
