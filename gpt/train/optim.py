"""AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, a guard that skips
non-finite steps, and the learning-rate schedule (linear warmup, cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from gpt.config import OptimConfig


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
    NaN or infinite: the parameters and moments stay unchanged. DeepSpeed reads
    ``overflow`` after each step and counts a skip; under ZeRO each rank sees only its
    partition, hence the all-reduce of the verdict.

    ``clip`` > 0 makes it clip the global gradient norm itself (used where DeepSpeed does
    not: fp32 without ZeRO); the norm it measured is left in ``_global_grad_norm``."""

    def __init__(self, params, clip: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip
        self.overflow = False

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        grads = self._grads()
        device = grads[0].device if grads else torch.device("cpu")
        finite = torch.tensor([float(all(torch.isfinite(g).all() for g in grads))], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.overflow = finite.item() < 1
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.param_groups for p in g["params"]], self.clip
            )
            self._global_grad_norm = norm.item()
        if self.overflow:
            return None
        return super().step(closure)
