"""FlashAttention-2 in Triton: exact attention, forward and backward, in O(T) memory.

Implements Algorithms 1 (forward) and 2 (backward) of

    Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", 2023 (arXiv:2307.08691),

which refines FlashAttention (Dao et al. 2022, arXiv:2205.14135). The (T, S) score matrix
is never written to memory. Each program keeps one tile of rows on chip (registers and
shared memory, "SRAM" below) and streams the tiles of the other operand through it:

* forward: a (BLOCK_M, D) tile of Q stays in SRAM while (BLOCK_N, D) tiles of K and V stream
  past; an *online softmax* keeps, per query row, the running maximum m and running
  denominator l, and rescales the output accumulator whenever m grows. Besides O we store
  one float per row, the log-sum-exp L = m + log(l), which is all the backward needs.
* backward: scores are *recomputed* from Q, K and L (P = exp(S - L) is already
  normalised), never loaded. Three kernels, none with atomics:
    1. delta = rowsum(dO * O)    (one value per query row; gpt.kernels.attention_op's kernel)
    2. dK, dV: a K/V tile stays in SRAM, Q/dO tiles stream past;
       with grouped-query attention the program also loops over the query heads that
       share its K/V head, so the reduction over the group happens in SRAM.
    3. dQ: a Q/dO tile stays in SRAM, K/V tiles stream past.
  Splitting dQ from dK/dV costs one extra recomputation of P but avoids the atomic adds
  of the paper's single-pass variant, which keeps results deterministic.

Conventions. Scores are kept in base 2: we fold log2(e) into the softmax scale once, so
the inner loops call exp2 (one hardware instruction) instead of exp, and the saved
log-sum-exp L is in base-2 units too. All accumulators are float32 whatever the input
dtype; P and dS are cast back to the input dtype before they feed a matrix product, as in
the paper. Tiles are padded to powers of two: rows past T, keys past S and head-dim
columns past D are loaded as zeros and masked, so any T >= 1 and any D <= 256 work.

Masking. A score s[m, n] is kept when key n exists (n < S) and, if causal, n <= m + S - T:
the causal mask is aligned to the bottom-right corner (FlashAttention-2's convention), so
with a KV cache (T new queries after S - T cached keys) query m sees the whole cache and
the new keys up to its own position; for T == S it is the usual n <= m. Causal needs
T <= S. Masked scores are set to -inf before the softmax, so their weight is exactly 0.
The running maximum starts at a large *finite* negative number (not -inf) so that a row
whose first tiles are entirely masked computes exp2(-inf - finite) = 0 rather than
exp2(-inf + inf) = NaN; a row with no visible key at all (never the case for T <= S)
would end with l = 0, which we also guard.

Block sizes are autotuned on a GPU (key: sequence lengths rounded up to a power of two,
head dim, causality and, automatically, the tensors' dtypes; candidates pruned per head
dim and dtype: see gpt.kernels.tuning). Under the Triton interpreter (TRITON_INTERPRET=1,
CPU, for correctness only) autotuning cannot time anything, so one fixed configuration
is used: BLOCK_M = 32 query rows by BLOCK_N = 16 keys in the forward and dQ kernels and
the mirror image in the dK/dV kernel. Unequal blocks make tiles straddle the causal
diagonal in every way, and small blocks make short test sequences span several tiles.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor

from gpt.kernels import tuning
from gpt.kernels.attention_op import (
    LOG2E,
    MIN_INIT,  # finite stand-in for -inf as the initial running max (see "Masking" above)
    AttentionOp,
    autotune,
    block_d,
    dot_precision,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,  # inputs (B, H, T, D), (B, H_kv, S, D) x2; outputs (B, H, T, D), (B*H, T)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, D, GROUP,  # GROUP = H // H_kv query heads share one K/V head
    qk_scale,  # softmax scale * log2(e)
    T_BUCKET, S_BUCKET,  # T and S rounded up to powers of two: the autotune key, unused here
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program = one (BLOCK_M, D) tile of queries of one (batch, head).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    # int64: b * stride_qb can pass 2**31 elements for large batches
    b = (bh // H).to(tl.int64)
    h = bh % H
    h_kv = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns, relative to the K/V tile
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim columns
    row_ok = offs_m < T
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    # --- Stays in SRAM for the whole program --------------------------------------
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], MIN_INIT, dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output

    # Causal (bottom-right): row m sees keys n <= m + S - T, so keys past the last row of
    # this tile, shifted by S - T, are invisible to all of its rows.
    hi = tl.minimum(S, start_m + BLOCK_M + S - T) if IS_CAUSAL else S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kv_mask = col_ok[:, None] & d_ok[None, :]
        # --- Streamed through SRAM, one tile per iteration --------------------------
        k = tl.load(
            k_base + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        keep = col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_m[:, None] + (S - T) >= cols[None, :])
        s = tl.where(keep, s, float("-inf"))

        # Online softmax (Algorithm 1, lines 8-10): raise the max, rescale what we have.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)  # (BLOCK_M,) <= 1; factor for the old sum and output
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N); masked entries are exactly 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # Normalise once at the end (FlashAttention-2's change from v1: fewer divisions).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only a row with no visible key has l == 0
    acc = acc / l_safe[:, None]
    o_ptrs = OUT + b * stride_ob + h * stride_oh
    o_ptrs += offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)  # base-2 log-sum-exp


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # DK and DV share one layout
    H, H_KV, T, S, D, GROUP,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    T_BUCKET, S_BUCKET,  # the autotune key, unused here
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program = one (BLOCK_N, D) tile of keys of one (batch, kv head). We work with the
    # transposed score tile sT = K Qᵀ (BLOCK_N, BLOCK_M) so that dK and dV come out
    # row-major without transposing the accumulators.
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b = (bh_kv // H_KV).to(tl.int64)
    h_kv = bh_kv % H_KV

    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key rows of this tile
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) query columns, relative to the Q tile
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < S
    d_ok = offs_d < D
    kv_mask = key_ok[:, None] & d_ok[None, :]

    # --- Stays in SRAM: this tile of K and V and its two gradient accumulators ---------
    k_ptrs = K + b * stride_kb + h_kv * stride_kh
    k_ptrs += offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h_kv * stride_vh
    v_ptrs += offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Causal: queries before row start_n - (S - T) cannot see this key tile; start at the Q
    # tile holding that row (rounded down to a tile boundary; the diagonal is masked below).
    lo = (tl.maximum(start_n - (S - T), 0) // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    # Grouped-query attention: every query head of the group read this K/V head, so its
    # gradient is the sum over the group; accumulate it here, in SRAM.
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < T
            qd_mask = row_ok[:, None] & d_ok[None, :]
            # --- Streamed: Q and dO tiles (BLOCK_M, BLOCK_D), their L and delta --------
            q = tl.load(
                q_base + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qd_mask,
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                mask=qd_mask,
                other=0.0,
            )
            lse = tl.load(LSE + (b * H + h) * T + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
            delta = tl.load(DELTA + (b * H + h) * T + rows, mask=row_ok, other=0.0)

            # Recompute the probabilities, transposed: pT[n, m] = P[m, n].
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            keep = key_ok[:, None] & row_ok[None, :]  # (BLOCK_N, BLOCK_M)
            if IS_CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + (S - T))
            # masking the scores (not the exponentials) keeps exp2 from overflowing on
            # large masked scores: exp2(-inf) is exactly 0
            sT = tl.where(keep, sT, float("-inf"))
            pT = tl.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M)

            # dV += Pᵀ dO
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            # dP = dO Vᵀ, so dPᵀ = V dOᵀ; dS = P * (dP - delta)   (softmax backward)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            # dK += dSᵀ Q (the softmax scale is applied once, after the loop)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk_off = b * stride_dkb + h_kv * stride_dkh
    dk_off += offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, D, GROUP,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    T_BUCKET, S_BUCKET,  # the autotune key, unused here
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program = one (BLOCK_M, D) tile of queries of one (batch, head); same tiling and
    # masking as the forward kernel.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    h_kv = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]

    # --- Stays in SRAM: Q and dO tiles (BLOCK_M, BLOCK_D), L and delta, the dQ accumulator
    q_ptrs = Q + b * stride_qb + h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh
    do_ptrs += offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    q = tl.load(q_ptrs, mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=qd_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    hi = tl.minimum(S, start_m + BLOCK_M + S - T) if IS_CAUSAL else S
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kv_mask = col_ok[:, None] & d_ok[None, :]
        # --- Streamed: K and V tiles (BLOCK_N, BLOCK_D) ----------------------------------
        k = tl.load(
            k_base + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        keep = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_m[:, None] + (S - T) >= cols[None, :])
        s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N), exactly 0 where masked
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        # dQ += dS K (scale applied after the loop)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh
    dq_ptrs += offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------------------
# Launch configuration: autotuned on a GPU, fixed in the interpreter
# --------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N) for the interpreter. The dK/dV kernel uses them swapped, so that in
# every kernel the tile held in SRAM is the 32-row one.
_INTERPRET_BLOCKS = (32, 16)
# Lengths enter the key as buckets (tuning.length_bucket); Triton appends the dtypes.
AUTOTUNE_KEY = ["T_BUCKET", "S_BUCKET", "BLOCK_D", "IS_CAUSAL"]
# The candidates measured when this kernel was the best on an H100 (issue 17): (held rows,
# streamed rows) x 4 or 8 warps x 2 or 3 stages. For the forward and dQ kernels 2 and 3
# stages compile to byte-identical code (their masked pointer loads are not pipelined:
# gpt.kernels.resources shows the same shared memory and registers, and the cubins'
# hashes match), so only 2 is tried there: 10 candidates instead of 20, none lost.
_PAIRS = [(128, 64), (128, 32), (64, 64), (64, 32), (32, 32)]
GPU_TILES = {
    "fwd": [tuning.Tile(h, s, w, 2) for h, s in _PAIRS for w in (4, 8)],
    "dq": [tuning.Tile(h, s, w, 2) for h, s in _PAIRS for w in (4, 8)],
    "dkdv": [tuning.Tile(h, s, w, st) for h, s in _PAIRS for w in (4, 8) for st in (2, 3)],
}


def autotuned(kernel, role: str, tiles=None, do_bench=None):
    """``kernel`` wrapped in triton.autotune: on a GPU over ``tiles`` (default
    GPU_TILES[role]) pruned per head dim and dtype, in the interpreter over its one fixed
    configuration (a single configuration is never timed). ``do_bench`` replaces Triton's
    timer (tests)."""
    if tiles is None:
        m, n = _INTERPRET_BLOCKS
        tiles = [tuning.Tile(m, n, 4, 2)] if _INTERPRET else GPU_TILES[role]
    return autotune(kernel, role, tiles, AUTOTUNE_KEY, do_bench)


# The @triton.jit kernels by role, and the autotuned wrappers the launches look up (tests
# replace them).
JIT_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
TUNED_KERNELS = {role: autotuned(kernel, role) for role, kernel in JIT_KERNELS.items()}


def _grid(length: int, block: str, programs: int):
    return lambda meta: (triton.cdiv(length, meta[block]), programs)


# --------------------------------------------------------------------------------------
# Launches; gpt.kernels.attention_op makes them custom ops
# --------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, o: Tensor, lse: Tensor):
    """Fills O (B, H, T, D) and the base-2 log-sum-exp L (B, H, T)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    TUNED_KERNELS["fwd"][_grid(T, "BLOCK_M", B * H)](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T, S, D, H // k.shape[1],
        scale * LOG2E,
        tuning.length_bucket(T), tuning.length_bucket(S),
        IS_CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d(D),
    )  # fmt: skip


def _backward(do, q, k, v, lse, delta, causal: bool, scale: float, dq, dk, dv):
    """Fills dQ, dK, dV, given L and delta = rowsum(dO * O)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    options = {"IS_CAUSAL": causal, "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": block_d(D)}
    TUNED_KERNELS["dkdv"][_grid(S, "BLOCK_N", B * H_kv)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        H, H_kv, T, S, D, group,
        scale * LOG2E, scale,
        tuning.length_bucket(T), tuning.length_bucket(S),
        **options,
    )  # fmt: skip
    TUNED_KERNELS["dq"][_grid(T, "BLOCK_M", B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, T, S, D, group,
        scale * LOG2E, scale,
        tuning.length_bucket(T), tuning.length_bucket(S),
        **options,
    )  # fmt: skip


OP = AttentionOp("flash_attention", _forward, _backward)  # gpt::flash_attention_fwd, _bwd


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Exact softmax(q kᵀ · scale + mask) v without materialising the scores; differentiable.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv (query head h reads
    K/V head h // (H // H_kv)). ``causal`` needs T <= S: query i sees keys up to
    i + S - T (bottom-right alignment). ``scale`` defaults to 1/sqrt(D).
    Inputs may be float32, float16 or bfloat16 (not in the interpreter) and need not be
    contiguous; the output is a contiguous (B, H, T, D) tensor of q's dtype.
    """
    return OP(q, k, v, causal, scale)
