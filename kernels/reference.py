"""The attention contract's shape check and the naive reference every kernel is tested against.

Kept beside the kernels (and below ``gpt.attention``, which registers ``naive_attention`` as a
backend) so that a kernel can import the contract without importing the registry that loads it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_shapes(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    """Validate the registry contract; backends call this once per call, outside hot loops."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})"
        )
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs T <= S (the queries are the last T of the S positions); "
            f"got T={q.shape[2]}, S={k.shape[2]}"
        )


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= S - T + i. The mask is aligned to
    the bottom-right corner (FlashAttention-2's convention): the T queries are the last T of
    the S positions, so T == S is the usual lower triangle and a single query (T == 1) sees
    every key."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * groups, S, D), each kv head repeated for its query group."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q kᵀ · scale + mask) v with the full (T, S) score matrix materialised.

    The reference every other backend is tested against; with ``return_weights`` it also
    returns the attention weights (B, H, T, S), for visualisation.
    """
    check_shapes(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:  # bottom-right aligned when T < S (check_shapes refuses T > S)
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    # softmax in float32 at least (as fused kernels do; float64 stays float64), then back
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    weights = weights.to(q.dtype)
    out = weights @ v  # (B, H, T, D)
    return (out, weights) if return_weights else out
