"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021), and freezing for fine-tuning.

A targeted ``nn.Linear`` W (out, in) becomes ``W x + (alpha / r) * B A dropout(x)`` with
A (r, in) and B (out, r); B starts at zero, so the adapted model starts equal to the base.
Only A and B train; every base weight is frozen. ``merge_lora`` folds ``(alpha / r) B A``
into W and restores plain ``nn.Linear`` layers: the merged model is an ordinary GPT (it
exports to Hugging Face like any other) whose logits equal the adapted model's.

Adapter parameters are named ``<layer>.lora_A`` / ``<layer>.lora_B`` (e.g.
``transformer.h.0.attn.c_attn.lora_A``); the base weight stays at ``<layer>.weight``, so a
base state dict loads into an adapted model unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gpt.config import LORA_TARGETS, ModelConfig
from gpt.model import linear_shapes


def max_rank(cfg: ModelConfig, targets: list[str]) -> tuple[int, str]:
    """The largest rank LoRA may use on ``targets`` of a model of shape ``cfg``, and the layer
    that sets it: min(in, out) over the targeted layers. B A, of shape (out, in), has rank at
    most min(in, out): a larger r adds parameters (r * (in + out) per layer, more than the
    layer's own in * out) but no capacity."""
    shapes = linear_shapes(cfg)
    name = min(sorted(set(targets)), key=lambda t: min(shapes[t]))
    return min(shapes[name]), f"{name} is {shapes[name][0]} -> {shapes[name][1]}"


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update; same parameter names as the layer it
    replaces, plus ``lora_A`` and ``lora_B``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) tensors
        self.rank, self.scale = rank, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (.., out)
        return super().forward(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        valid = ", ".join(LORA_TARGETS)
        raise ValueError(f"finetune.lora_targets: unknown {unknown}; valid: {valid}")
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                found.append((module, child_name, child))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Freeze every parameter of ``model`` and wrap each targeted linear layer in place with
    a LoRALinear; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, child in _targets(model, targets):
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place (plain layers again); returns the
    model. Weight tying is untouched: adapters never target the embedding or the head."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters only (what a LoRA checkpoint stores besides the base)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def freeze(model: nn.Module, embeddings: bool, blocks: int) -> None:
    """Freeze the token/position embeddings (and, when tied, the LM head that shares the
    token embedding) and/or the first ``blocks`` Transformer blocks."""
    if embeddings:
        for name in ("wte", "wpe"):
            if name in model.transformer:
                model.transformer[name].requires_grad_(False)
    for block in list(model.transformer.h)[:blocks]:
        block.requires_grad_(False)


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once, and of a GPT's real vocabulary
    only (as ``GPT.num_params``: the rows ``vocab_multiple`` pads the token embedding and
    LM head with are not counted)."""
    cfg = getattr(model, "cfg", None)
    padding = cfg.padded_vocab_size - cfg.vocab_size if cfg is not None else 0
    n = 0
    for name, p in model.named_parameters():  # a tied head is listed once
        if p.requires_grad:
            # under ZeRO-3 a parameter is an empty placeholder: its whole size is ds_numel
            n += getattr(p, "ds_numel", p.numel())
            if padding and name in ("transformer.wte.weight", "lm_head.weight"):
                n -= padding * getattr(p, "ds_shape", p.shape)[1]
    return n
