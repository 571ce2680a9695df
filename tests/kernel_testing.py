"""Shared helpers of the attention-kernel tests: inputs, and a float64 reference computed from
the explicit formulas with an explicit bottom-right causal mask (query i sees keys j <= i + S - T),
independent of every backend in gpt.attention."""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("O", "dQ", "dK", "dV")


def make_inputs(B, H, H_kv, T, S, D, dtype, layout="bhtd", seed=0):
    """q (B, H, T, D), k, v (B, H_kv, S, D) and a gradient dO for the output.

    With layout "bthd" the tensors are views of (B, T, H, D) storage, as the model's
    (B, T, H, D) -> (B, H, T, D) transpose produces them: not contiguous.
    """
    gen = torch.Generator().manual_seed(seed)

    def make(heads, length):
        if layout == "bthd":
            x = torch.randn(B, length, heads, D, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(B, heads, length, D, generator=gen)
        return x.to(device=DEVICE, dtype=dtype)

    q, k, v = make(H, T), make(H_kv, S), make(H_kv, S)
    do = torch.randn(B, H, T, D, generator=gen).to(device=DEVICE, dtype=dtype)
    return q, k, v, do


def explicit_attention(q, k, v, causal=True, scale=None):
    """softmax(q kᵀ · scale + mask) v from its definition, in q's dtype (softmax in float32 at
    least, as fused kernels do): each K/V head repeated for its query group, and the
    causal mask built from indices, aligned to the bottom-right corner."""
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        rows = torch.arange(T, device=q.device)[:, None]
        cols = torch.arange(S, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (S - T), -math.inf)
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return weights.to(q.dtype) @ v


def forward_backward(fn, q, k, v, do, causal, scale):
    """(O, dQ, dK, dV) of ``fn`` at (q, k, v) with output gradient ``do``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, causal=causal, scale=scale)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def reference(q, k, v, do, causal, scale):
    """float64 (O, dQ, dK, dV)."""
    as64 = [x.double() for x in (q, k, v, do)]
    return forward_backward(explicit_attention, *as64, causal, scale)


def max_err(a, ref) -> float:
    return (a.double() - ref).abs().max().item()


def check_against_reference(fn, q, k, v, do, causal, scale) -> None:
    """``fn``'s O, dQ, dK, dV against float64: relative 1e-4 in float32; in float16/bfloat16
    at most twice the error of the same formulas computed by PyTorch in that dtype."""
    ours = forward_backward(fn, q, k, v, do, causal, scale)
    ref = reference(q, k, v, do, causal, scale)
    for name, a, r in zip(NAMES, ours, ref, strict=True):
        assert a.shape == r.shape and a.dtype == q.dtype, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
    if q.dtype == torch.float32:
        for name, a, r in zip(NAMES, ours, ref, strict=True):
            # Relative to the largest reference entry. At T = 1 the exact dQ and dK are
            # identically zero (softmax over one key has zero gradient) and ours are rounding
            # residue of dP - delta; there the bound is absolute, for unit-scale inputs.
            rel = max_err(a, r) / (r.abs().max().item() or 1.0)
            assert rel <= 1e-4, f"{name}: relative error {rel:.2e} > 1e-4"
    else:
        # flash-attn's rule: at most twice the error of PyTorch's own computation in the same
        # dtype, both measured against the float64 reference. The 1e-5 floor is for entries
        # that PyTorch gets exactly right (the zero gradients at T = 1).
        torch_low = forward_backward(explicit_attention, q, k, v, do, causal, scale)
        for name, a, t, r in zip(NAMES, ours, torch_low, ref, strict=True):
            err, torch_err = max_err(a, r), max_err(t, r)
            assert err <= 2 * torch_err + 1e-5, (
                f"{name}: error {err:.2e}, PyTorch's {torch_err:.2e}"
            )
