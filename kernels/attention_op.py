"""What every Triton attention kernel shares around its kernels: the PyTorch custom ops.

A kernel module (gpt.kernels.flash_attention, gpt.kernels.flash_attention_packed_gqa) holds
its ``@triton.jit`` kernels and two launch functions that fill outputs given to them,

    forward(q, k, v, causal, scale, O, L)
    backward(dO, q, k, v, L, delta, causal, scale, dQ, dK, dV)

and hands them to ``AttentionOp``, which registers them once as the custom ops
``gpt::<name>_fwd`` and ``gpt::<name>_bwd`` (torch.library, so that torch.compile treats
the kernels as opaque calls) with their fake-tensor implementations and the autograd
formula that links the two, allocates the outputs (and computes delta) before a launch,
and checks a call's inputs against what the kernels support.
Also here: autotuning a kernel by its role; the backward's first kernel, delta =
rowsum(dO * O) (FlashAttention-2, Algorithm 2, line 4; Dao 2023, arXiv:2307.08691), which does
not depend on how a kernel tiles the rest of the work; the shared-memory footprints that
tuning.prune charges for each kernel's tiles; the constants and small helpers of the launch
code.

Conventions shared by every kernel (gpt.kernels.flash_attention's docstring explains them):
O is a contiguous (B, H, T, D) tensor of q's dtype and L the base-2 log-sum-exp of each
query row, a contiguous (B, H, T) float32 tensor; dQ, dK and dV are contiguous, in the
dtypes of q, k and v.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt.kernels import tuning
from gpt.kernels.reference import check_shapes

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
# Finite stand-in for -inf as the initial running max of the online softmax, so that a row
# whose first key tiles are all masked computes exp2(-inf - finite) = 0, not NaN.
MIN_INIT = tl.constexpr(-1.0e30)
# What each kernel keeps in shared memory (tuning.Footprint), by role: the forward holds Q
# and streams K and V; dQ holds Q and dO, streams K and V; dK/dV holds K and V, streams Q
# and dO.
FOOTPRINTS = {
    "fwd": tuning.Footprint(held_tiles=1, streamed_tiles=2),
    "dq": tuning.Footprint(held_tiles=2, streamed_tiles=2),
    "dkdv": tuning.Footprint(held_tiles=2, streamed_tiles=2),
}
# Query rows per program of the delta kernel: a small block in the interpreter, so that
# short test sequences span several programs.
_DELTA_BLOCK = 32 if _INTERPRET else 64

Forward = Callable[[Tensor, Tensor, Tensor, bool, float, Tensor, Tensor], None]
Backward = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float, Tensor, Tensor, Tensor], None
]


def autotune(
    kernel,
    role: str,
    tiles: list[tuning.Tile],
    key: list[str],
    do_bench=None,
    keep: Callable | None = None,
    rank: Callable | None = None,
    pre_hook: Callable | None = None,
):
    """``kernel``, the one of role "fwd", "dq" or "dkdv", wrapped in triton.autotune over
    ``tiles``, pruned per call by tuning.prune with the role's footprint (and ``keep``,
    ``rank``). ``do_bench`` replaces Triton's timer (tests); ``pre_hook`` runs before each
    configuration's launch."""
    holds_queries = role != "dkdv"
    prune = functools.partial(
        tuning.prune, footprint=FOOTPRINTS[role], holds_queries=holds_queries, keep=keep, rank=rank
    )
    return triton.autotune(
        configs=tuning.configs(tiles, holds_queries, pre_hook=pre_hook),
        key=key,
        prune_configs_by={"early_config_prune": prune},
        do_bench=do_bench,
    )(kernel)


def block_d(D: int) -> int:
    """The head-dim side of every tile: D padded to a power of two, at least 16 (tl.dot
    needs every tile side >= 16); the columns past D are masked."""
    return max(16, triton.next_power_of_2(D))


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' DOT_PRECISION: float32 inputs get exact fp32 products (a GPU would
    otherwise round them to TF32); for float16 and bfloat16 the option is ignored."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, kernel: str) -> None:
    """The registry's shape contract plus what the kernels support; ``kernel`` names the
    caller in the error messages."""
    if not _INTERPRET and not q.is_cuda:
        raise RuntimeError(
            f"{kernel} needs CUDA tensors on an NVIDIA GPU, or TRITON_INTERPRET=1 set "
            f"before start-up to run in Triton's interpreter on the CPU; got a {q.device} tensor"
        )
    # The causal lengths are checked here: the kernels mask bottom-right and so accept
    # T <= S, where the older contract in check_shapes asked for T == S.
    check_shapes(q, k, v, causal=False)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs T <= S (the mask is aligned to the last key); got "
            f"T={q.shape[2]}, S={k.shape[2]}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} unsupported; use float16, bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} unsupported; at most 256")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: T={q.shape[2]}, S={k.shape[2]}")


# --------------------------------------------------------------------------------------
# The backward's preprocessing: delta = rowsum(dO * O)
# --------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA,  # (B, H, T, D) x2 -> (B*H, T)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i: the softmax-backward term that would
    # otherwise need the whole row of P (Algorithm 2, line 4).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # b * stride_ob can pass 2**31 elements for large batches
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    o_ptrs = OUT + b * stride_ob + h * stride_oh
    o_ptrs += offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    do_ptrs = DO + b * stride_dob + h * stride_doh
    do_ptrs += offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


def backward_delta(o: Tensor, do: Tensor) -> Tensor:
    """rowsum(dO * O) of (B, H, T, D) tensors in float32, (B, H, T) contiguous: the first
    kernel of every backward."""
    B, H, T, D = o.shape
    delta = torch.empty((B, H, T), dtype=torch.float32, device=o.device)
    _delta_kernel[(triton.cdiv(T, _DELTA_BLOCK), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T, D,
        BLOCK_M=_DELTA_BLOCK, BLOCK_D=block_d(D),
    )  # fmt: skip
    return delta


# --------------------------------------------------------------------------------------
# PyTorch custom ops (torch.library), so torch.compile treats the kernels as opaque calls
# --------------------------------------------------------------------------------------


class AttentionOp:
    """One attention kernel as the custom ops ``gpt::<name>_fwd`` and ``gpt::<name>_bwd``,
    differentiable, with fake-tensor implementations; calling it checks the inputs and
    runs the forward.

    ``forward`` and ``backward`` launch the kernels (module docstring for their contract);
    ``name`` names the ops and, in error messages, the public function."""

    def __init__(self, name: str, forward: Forward, backward: Backward):
        self.name = name

        def fwd(
            q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
        ) -> tuple[Tensor, Tensor]:
            o, lse = forward_outputs(q, k, v, causal, scale)
            forward(q, k, v, causal, scale, o, lse)
            return o, lse

        def bwd(
            do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
            scale: float,
        ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
            dq, dk, dv = backward_outputs(do, q, k, v, o, lse, causal, scale)
            delta = backward_delta(o, do)
            backward(do, q, k, v, lse, delta, causal, scale, dq, dk, dv)
            return dq, dk, dv

        self.forward = torch.library.custom_op(f"gpt::{name}_fwd", fwd, mutates_args=())
        self.backward = torch.library.custom_op(f"gpt::{name}_bwd", bwd, mutates_args=())
        self.forward.register_fake(forward_outputs)
        self.backward.register_fake(backward_outputs)
        self.forward.register_autograd(self._gradients, setup_context=_save_for_backward)

    def _gradients(self, ctx, do: Tensor, _dlse: Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = self.backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None  # nothing for causal and scale

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
    ) -> Tensor:
        """softmax(q kᵀ · scale + mask) v; ``scale`` defaults to 1/sqrt(D)."""
        check_inputs(q, k, v, causal, self.name)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, _ = self.forward(q, k, v, causal, scale)
        return out


def forward_outputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    """The forward op's outputs, empty: O (B, H, T, D) of q's dtype and L (B, H, T) float32,
    both contiguous. Also the op's fake implementation."""
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


def backward_outputs(do, q, k, v, o, lse, causal, scale):
    """The backward op's outputs, empty: dQ, dK, dV shaped, typed and placed like q, k, v.
    Also the op's fake implementation."""
    # contiguous, like the real outputs (empty_like would copy a transposed input's strides)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)
