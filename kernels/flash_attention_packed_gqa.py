"""FlashAttention-2 with packed grouped-query heads, split loops and an optional persistent
launch: the ``triton-packed-gqa`` attention backend (``triton-hopper`` before issue 23).

The algorithm, conventions and masks are those of gpt.kernels.flash_attention (read its
docstring first: base-2 scores, online softmax, recomputed P, bottom-right causal mask,
three backward kernels without atomics). This file changes how the work is cut and fed,
for the shapes where that kernel trails cuDNN on an H100 (issue 17). Every item is a
structural change checked in the interpreter; which of them pay is for GPU measurements
to say (kernels/NOTES.md).

1. *Split loops.* Each program walks its key tiles (query tiles in dK/dV) in two loops:
   the tiles that every row of the program sees completely, with no mask at all (no index
   arithmetic, no select), then the few tiles on the causal diagonal or past the end of
   the sequence, masked. Without a mask only a ragged last tile is masked.
2. *Tensor descriptors.* On compute capability 9+ (Hopper), the streamed operands (K and V
   in the forward and dQ kernels, Q and dO in dK/dV) are read through host-built tensor
   descriptors (``triton.tools.tensor_descriptor``): the copy engine (TMA) moves a whole
   tile into shared memory and zero-fills it past the tensor's edges, instead of every
   thread computing and masking addresses. Descriptors are 4-D, (B, heads, length, D), so
   any layout with a contiguous last dim and 16-byte aligned strides qualifies (the
   model's transposed (B, T, H, D) views included); other inputs, older GPUs, and
   ``GPT_FLASH_TMA=0`` use pointer loads. The interpreter runs both paths.
3. *Packed grouped-query heads.* One program handles all GROUP = H / H_kv query heads that
   share a K/V head: its BLOCK_M rows are packed (position r // GROUP, head r % GROUP), so
   each K/V tile is loaded once for the whole group rather than once per head. A decode
   step (T = 1) then fills a tile with the group's heads instead of one row.
4. *Launch order.* Tiles are numbered heads-fastest and, when causal, heaviest first (the
   last query tiles see the most keys; in dK/dV the first key tiles are seen by the most
   queries), so that long programs start early and short ones fill the tail. With
   ``GPT_FLASH_PROGRAMS_PER_SM=n`` the launch is persistent: n programs per multiprocessor
   loop over the tiles in that order (default 0: one program per tile; the persistent
   loop is compiled only when asked for, as it costs registers: at D = 128 the dK/dV
   kernel spills with it and does not without it).
5. *Configurations per head dim and dtype* from small tables (gpt.kernels.tuning), keyed
   on length buckets; packed tiles of at most 16 rows (decoding) get a fixed 16-row tile
   and no autotuning.

The file runs past 450 lines because its three kernels each carry the split causal loop and
both load paths (descriptors, pointers) as compile-time switches; the op plumbing they share
with gpt.kernels.flash_attention is gpt.kernels.attention_op's.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from gpt.kernels import tuning
from gpt.kernels.attention_op import (
    LOG2E,
    MIN_INIT,
    AttentionOp,
    autotune,
    block_d,
    dot_precision,
)

try:  # Triton >= 3.4; the kernels fall back to pointer loads without it
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TMA_ENABLED = os.environ.get("GPT_FLASH_TMA", "1") != "0"
PROGRAMS_ENV = "GPT_FLASH_PROGRAMS_PER_SM"
# The interpreter runs programs one after another: a few programs looping over many tiles
# exercise the persistent loop at no cost (None: one program per tile, as on a GPU).
_INTERPRET_PROGRAMS: int | None = 3


# --------------------------------------------------------------------------------------
# Shared pieces: which tiles a program handles, in which order; tile loads; key ranges
# --------------------------------------------------------------------------------------


@triton.jit
def _program_tiles(n_tiles, PERSISTENT: tl.constexpr):
    """(first, count, step): this program handles the tiles first + n * step for n < count.
    PERSISTENT: every programs-th tile from pid on (item 4). Otherwise tile pid alone, with
    a constant count of 1, so that the loop over it compiles away (a loop costs registers)."""
    pid = tl.program_id(0)
    if PERSISTENT:
        step = tl.num_programs(0)
        return pid, tl.cdiv(n_tiles - pid, step), step
    else:
        return pid, 1, 1


@triton.jit
def _tile_coords(tile, n_bh, n_tiles_per_bh, HEAVIEST_LAST: tl.constexpr):
    """Tile number -> (tile index along the sequence, batch * kv-head index). Heads vary
    fastest; with HEAVIEST_LAST the sequence index counts down from the last tile."""
    bh = tile % n_bh
    i = tile // n_bh
    if HEAVIEST_LAST:
        i = n_tiles_per_bh - 1 - i
    return i, bh


@triton.jit
def _packed_rows(tile, B, H_KV, T, GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr):  # fmt: skip
    """The BLOCK_M packed query rows of a forward or dQ tile (module docstring, item 3):
    the tile's index i along the rows, its batch b (int32, int64), kv head, and per row
    its position t, query head h and whether it exists. Heaviest first when causal."""
    n_rows = T * GROUP
    i, bh = _tile_coords(tile, B * H_KV, tl.cdiv(n_rows, BLOCK_M), IS_CAUSAL)
    b32 = bh // H_KV
    b = b32.to(tl.int64)  # b * stride_qb can pass 2**31 elements for large batches
    h_kv = bh % H_KV
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) packed rows
    t = rows // GROUP  # their positions
    h = h_kv * GROUP + rows % GROUP  # their query heads
    return i, b32, b, h_kv, t, h, rows < n_rows


@triton.jit
def _key_ranges(i, T, S, GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """(full_end, hi) for row tile i: key tiles [0, full_end) are seen whole by every row
    of the tile (with a causal mask, those ending at or before the first row's last key,
    t_first + S - T; without, all complete tiles); [full_end, hi) holds the diagonal or
    ragged tiles, to be masked."""
    if IS_CAUSAL:
        t_first = (i * BLOCK_M) // GROUP
        t_last = tl.minimum((i * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)
        full_end = ((t_first + S - T + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(S, t_last + S - T + 1)
    else:
        full_end = (S // BLOCK_N) * BLOCK_N
        hi = S
    return full_end, hi


@triton.jit
def _load_tile(
    DESC, base, b, h, start, LENGTH, D, stride_t, stride_d,
    MASK_ROWS: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_ROWS, BLOCK_D) tile of rows start.. of head h of batch b, zero past LENGTH
    and D: a copy-engine load through DESC, or pointer loads from ``base`` (that head's
    first row). Without MASK_ROWS the caller guarantees every row exists."""
    if USE_TMA:
        tile = DESC.load([b, h, start, 0]).reshape(BLOCK_ROWS, BLOCK_D)
    else:
        rows = start + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (cols < D)[None, :]
        if MASK_ROWS:
            mask = mask & (rows < LENGTH)[:, None]
        ptrs = base + rows[:, None] * stride_t + cols[None, :] * stride_d
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_tiles(
    acc, m_i, l_i, q, t,  # running state of the packed rows; t: their positions (BLOCK_M,)
    K_DESC, V_DESC, k_base, v_base, b32, h_kv,
    stride_kt, stride_kd, stride_vt, stride_vd,
    lo, hi, S, D, offset, qk_scale,  # offset = S - T: the causal diagonal's shift
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key tiles [lo, hi) (Algorithm 1, lines 6-10)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        # --- Streamed through SRAM, one tile per iteration ----------------------------
        k = _load_tile(K_DESC, k_base, b32, h_kv, start_n, S, D, stride_kt, stride_kd,
                       MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
        v = _load_tile(V_DESC, v_base, b32, h_kv, start_n, S, D, stride_vt, stride_vd,
                       MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
        if MASKED:  # the diagonal tiles and the ragged last one only
            cols = start_n + offs_n
            keep = (cols < S)[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= t[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # <= 1: rescales what was accumulated so far
        p = tl.exp2(s - m_new[:, None])  # masked entries are exactly 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K_DESC, V_DESC, K, V, OUT, LSE,  # K_DESC, V_DESC: descriptors with USE_TMA, else K, V
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    B, H, H_KV, T, S, D,
    qk_scale,  # softmax scale * log2(e)
    T_BUCKET, S_BUCKET,  # T and S rounded up to powers of two: the autotune key, unused here
    PERSISTENT: tl.constexpr,  # loop over tiles (GPT_FLASH_PROGRAMS_PER_SM)
    GROUP: tl.constexpr,  # query heads per K/V head
    IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One tile = BLOCK_M packed rows (position r // GROUP, head r % GROUP) of one (batch,
    # kv head); a program handles one tile, or loops over several when PERSISTENT.
    offset = S - T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    first, count, step = _program_tiles(tl.cdiv(T * GROUP, BLOCK_M) * B * H_KV, PERSISTENT)
    for n in range(0, count):
        tile = first + n * step
        i, b32, b, h_kv, t, h, row_ok = _packed_rows(tile, B, H_KV, T, GROUP, IS_CAUSAL,
                                                     BLOCK_M)  # fmt: skip
        qo_mask = row_ok[:, None] & d_ok[None, :]

        # --- Stays in SRAM for the whole tile -------------------------------------
        q_off = b * stride_qb + h * stride_qh + t * stride_qt
        q = tl.load(Q + q_off[:, None] + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0)
        m_i = tl.full([BLOCK_M], MIN_INIT, dtype=tl.float32)  # running row max (base 2)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output

        full_end, hi = _key_ranges(i, T, S, GROUP, IS_CAUSAL, BLOCK_M, BLOCK_N)
        k_base = K + b * stride_kb + h_kv * stride_kh
        v_base = V + b * stride_vb + h_kv * stride_vh
        acc, m_i, l_i = _fwd_key_tiles(
            acc, m_i, l_i, q, t, K_DESC, V_DESC, k_base, v_base, b32, h_kv,
            stride_kt, stride_kd, stride_vt, stride_vd, 0, full_end, S, D, offset, qk_scale,
            False, IS_CAUSAL, USE_TMA, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        acc, m_i, l_i = _fwd_key_tiles(
            acc, m_i, l_i, q, t, K_DESC, V_DESC, k_base, v_base, b32, h_kv,
            stride_kt, stride_kd, stride_vt, stride_vd, full_end, hi, S, D, offset, qk_scale,
            True, IS_CAUSAL, USE_TMA, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only a row with no visible key has l == 0
        acc = acc / l_safe[:, None]
        o_off = b * stride_ob + h * stride_oh + t * stride_ot
        o_ptrs = OUT + o_off[:, None] + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=qo_mask)
        tl.store(LSE + (b * H + h) * T + t, m_i + tl.log2(l_safe), mask=row_ok)


# --------------------------------------------------------------------------------------
# Backward (delta = rowsum(dO * O) is gpt.kernels.attention_op's kernel)
# --------------------------------------------------------------------------------------


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, keys,  # this program's key rows (BLOCK_N,) and their two accumulators
    Q_DESC, DO_DESC, q_base, do_base, lse_base, delta_base, b32, h,
    stride_qt, stride_qd, stride_dot, stride_dod,
    lo, hi, T, D, offset, qk_scale,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV over the query tiles [lo, hi) of one query head (Algorithm 2)."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        # --- Streamed: Q and dO tiles (BLOCK_M, BLOCK_D), their L and delta -------------
        q = _load_tile(Q_DESC, q_base, b32, h, start_m, T, D, stride_qt, stride_qd,
                       True, USE_TMA, BLOCK_M, BLOCK_D)  # fmt: skip
        do = _load_tile(DO_DESC, do_base, b32, h, start_m, T, D, stride_dot, stride_dod,
                        True, USE_TMA, BLOCK_M, BLOCK_D)  # fmt: skip
        # rows past T: L = +inf makes their P exactly 0, so no mask is needed below
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)

        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (N, M)
        if MASKED:  # causal diagonal: key n is seen by rows m with n <= m + offset
            sT = tl.where(keys[:, None] <= rows[None, :] + offset, sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])  # P transposed, already normalised
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += Pᵀ dO
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dPᵀ = V dOᵀ
        dsT = pT * (dpT - delta[None, :])  # dS = P * (dP - delta), transposed
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # dK += dSᵀ Q
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q_DESC, DO_DESC, Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,  # DK and DV share one layout
    B, H, H_KV, T, S, D,
    qk_scale, sm_scale,
    T_BUCKET, S_BUCKET,  # the autotune key, unused here
    PERSISTENT: tl.constexpr,  # loop over tiles (GPT_FLASH_PROGRAMS_PER_SM)
    GROUP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One tile = BLOCK_N keys of one (batch, kv head), held in SRAM with their dK and dV
    # while the Q/dO tiles of every query head of the group stream past (the sum over
    # the group happens here, without atomics). The first key tiles are the heaviest when
    # causal, and tiles are numbered from the first: no reversal.
    offset = S - T
    n_key_tiles = tl.cdiv(S, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    first, count, step = _program_tiles(n_key_tiles * B * H_KV, PERSISTENT)
    for n in range(0, count):
        tile = first + n * step
        j, bh = _tile_coords(tile, B * H_KV, n_key_tiles, False)
        b32 = bh // H_KV
        b = b32.to(tl.int64)
        h_kv = bh % H_KV
        start_n = j * BLOCK_N
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (keys < S)[:, None] & d_ok[None, :]

        # --- Stays in SRAM: this tile of K and V and its two gradient accumulators ---
        k_ptrs = K + b * stride_kb + h_kv * stride_kh
        k = tl.load(k_ptrs + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # fmt: skip
        v_ptrs = V + b * stride_vb + h_kv * stride_vh
        v = tl.load(v_ptrs + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # fmt: skip
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Query rows m see key n when n <= m + offset. Rows before `lo` see none of this
        # tile; rows from `mid` on see all of it; the tiles in [lo, mid) are masked.
        if IS_CAUSAL:
            lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
            first_full = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
            mid = tl.cdiv(first_full, BLOCK_M) * BLOCK_M
        else:
            lo = 0
            mid = 0
        for g in range(0, GROUP):
            h = h_kv * GROUP + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_base = LSE + (b * H + h) * T
            delta_base = DELTA + (b * H + h) * T
            dk, dv = _dkdv_query_tiles(
                dk, dv, k, v, keys, Q_DESC, DO_DESC, q_base, do_base, lse_base, delta_base,
                b32, h, stride_qt, stride_qd, stride_dot, stride_dod, lo, mid, T, D, offset,
                qk_scale, True, USE_TMA, DOT_PRECISION, BLOCK_M, BLOCK_D,
            )  # fmt: skip
            dk, dv = _dkdv_query_tiles(
                dk, dv, k, v, keys, Q_DESC, DO_DESC, q_base, do_base, lse_base, delta_base,
                b32, h, stride_qt, stride_qd, stride_dot, stride_dod, mid, T, T, D, offset,
                qk_scale, False, USE_TMA, DOT_PRECISION, BLOCK_M, BLOCK_D,
            )  # fmt: skip

        dk_off = b * stride_dkb + h_kv * stride_dkh
        dk_off += keys[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse, delta, t,
    K_DESC, V_DESC, k_base, v_base, b32, h_kv,
    stride_kt, stride_kd, stride_vt, stride_vd,
    lo, hi, S, D, offset, qk_scale,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ (unscaled) over the key tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_tile(K_DESC, k_base, b32, h_kv, start_n, S, D, stride_kt, stride_kd,
                       MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
        v = _load_tile(V_DESC, v_base, b32, h_kv, start_n, S, D, stride_vt, stride_vd,
                       MASKED, USE_TMA, BLOCK_N, BLOCK_D)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
        if MASKED:
            cols = start_n + offs_n
            keep = (cols < S)[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= t[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # exactly 0 where masked
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (M, N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS K
    return dq


@triton.jit
def _dq_kernel(
    Q, K_DESC, V_DESC, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    B, H, H_KV, T, S, D,
    qk_scale, sm_scale,
    T_BUCKET, S_BUCKET,  # the autotune key, unused here
    PERSISTENT: tl.constexpr,  # loop over tiles (GPT_FLASH_PROGRAMS_PER_SM)
    GROUP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # The forward's tiling (packed rows, same order, same two loops) with dQ as the output.
    offset = S - T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    first, count, step = _program_tiles(tl.cdiv(T * GROUP, BLOCK_M) * B * H_KV, PERSISTENT)
    for n in range(0, count):
        tile = first + n * step
        i, b32, b, h_kv, t, h, row_ok = _packed_rows(tile, B, H_KV, T, GROUP, IS_CAUSAL,
                                                     BLOCK_M)  # fmt: skip
        qd_mask = row_ok[:, None] & d_ok[None, :]

        # --- Stays in SRAM: Q and dO tiles, L and delta, the dQ accumulator ----------
        q_off = b * stride_qb + h * stride_qh + t * stride_qt
        q = tl.load(Q + q_off[:, None] + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do_off = b * stride_dob + h * stride_doh + t * stride_dot
        do = tl.load(DO + do_off[:, None] + offs_d[None, :] * stride_dod, mask=qd_mask,
                     other=0.0)  # fmt: skip
        # rows past the end: L = +inf makes their P exactly 0
        lse = tl.load(LSE + (b * H + h) * T + t, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + (b * H + h) * T + t, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        full_end, hi = _key_ranges(i, T, S, GROUP, IS_CAUSAL, BLOCK_M, BLOCK_N)
        k_base = K + b * stride_kb + h_kv * stride_kh
        v_base = V + b * stride_vb + h_kv * stride_vh
        dq = _dq_key_tiles(
            dq, q, do, lse, delta, t, K_DESC, V_DESC, k_base, v_base, b32, h_kv,
            stride_kt, stride_kd, stride_vt, stride_vd, 0, full_end, S, D, offset, qk_scale,
            False, IS_CAUSAL, USE_TMA, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        dq = _dq_key_tiles(
            dq, q, do, lse, delta, t, K_DESC, V_DESC, k_base, v_base, b32, h_kv,
            stride_kt, stride_kd, stride_vt, stride_vd, full_end, hi, S, D, offset, qk_scale,
            True, IS_CAUSAL, USE_TMA, DOT_PRECISION, BLOCK_N, BLOCK_D,
        )  # fmt: skip

        dq_off = b * stride_dqb + h * stride_dqh + t * stride_dqt
        dq_ptrs = DQ + dq_off[:, None] + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

# Autotune key: length buckets (tuning.length_bucket), head dim, mask, group, load path;
# Triton appends the tensors' dtypes.
AUTOTUNE_KEY = ["T_BUCKET", "S_BUCKET", "BLOCK_D", "IS_CAUSAL", "GROUP", "USE_TMA", "PERSISTENT"]
DECODE_ROWS = 16  # packed rows (T * GROUP) up to which the fixed decode tile is used
Tile = tuning.Tile
# Candidates per kernel and head-dim class (the largest BLOCK_D they serve), as (held rows,
# streamed rows, warps, stages), best guess first: quick mode (tests) keeps the first that
# fits. Chosen from the compiler's resource report for an H100 (gpt.kernels.resources,
# bench/results/resources-sm90/): none of them spills registers at its head dim, which
# rules out, e.g., 128-row dQ tiles and every dK/dV tile above 64 keys x 32 queries at
# D = 128. Which is fastest is for GPU measurements to say (kernels/NOTES.md).
GPU_TILES = {
    "fwd": {
        64: [Tile(128, 64, 4, 3), Tile(128, 128, 8, 3), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3),
             Tile(128, 32, 4, 3)],
        128: [Tile(128, 64, 8, 3), Tile(128, 128, 8, 2), Tile(128, 32, 8, 3), Tile(64, 64, 4, 3),
              Tile(64, 128, 8, 2)],
        256: [Tile(64, 64, 8, 2), Tile(64, 64, 4, 2), Tile(64, 32, 4, 3)],
    },
    "dq": {
        64: [Tile(128, 64, 8, 3), Tile(128, 32, 8, 3), Tile(64, 64, 4, 3), Tile(64, 32, 8, 2)],
        128: [Tile(64, 64, 8, 2), Tile(64, 64, 4, 3), Tile(64, 32, 8, 2), Tile(32, 64, 4, 2)],
        256: [Tile(64, 32, 8, 2), Tile(32, 64, 8, 2), Tile(32, 32, 4, 2)],
    },
    "dkdv": {  # held = keys (BLOCK_N), streamed = queries (BLOCK_M)
        64: [Tile(128, 64, 8, 3), Tile(64, 64, 8, 2), Tile(128, 32, 8, 2), Tile(64, 32, 8, 2)],
        128: [Tile(64, 32, 8, 2), Tile(32, 32, 4, 2), Tile(32, 64, 4, 2)],
        256: [Tile(32, 32, 8, 2), Tile(32, 16, 8, 2)],
    },
}  # fmt: skip
# Decode-sized calls (at most DECODE_ROWS packed query rows; forward only in practice).
DECODE_TILES = {"fwd": [Tile(DECODE_ROWS, 64, 4, 3), Tile(DECODE_ROWS, 128, 4, 2)],
                "dq": [Tile(DECODE_ROWS, 64, 4, 2)], "dkdv": []}  # fmt: skip
# The interpreter's one configuration per kernel: small unequal tiles, so that short test
# sequences span several tiles and every way of straddling the diagonal occurs.
INTERPRET_TILES = {role: [Tile(32, 16, 4, 2)] for role in GPU_TILES}


def _head_dim_class(block_d: int) -> int:
    return min(c for c in (64, 128, 256) if c >= block_d)


def _rank_tile(tile: Tile, args: dict, role: str, tables: dict | None) -> tuple[int, int]:
    """The order to try tiles in: their place in the head dim's table (or the decode table).
    float32 (IEEE products, on the FMA units with operands in registers: the tables'
    16-bit tiles spill there) tries the smallest tiles first."""
    if tables is None:
        return (0, 0)
    decode, table = DECODE_TILES[role], tables[_head_dim_class(args["BLOCK_D"])]
    place = decode.index(tile) if tile in decode else table.index(tile) if tile in table else 99
    return (tile.held * tile.streamed if args["Q"].element_size() == 4 else 0, place)


def _keep_tile(tile: Tile, args: dict, role: str, tables: dict | None) -> bool:
    """Decode-sized calls (packed query rows <= DECODE_ROWS) take the 16-row tiles only,
    others never: a decode step is then never timed, and prefill never wastes 3/4 of a
    tile. dK/dV holds keys, whose count is not small when decoding: no such rule. With
    ``tables`` (the default GPU tables), only the tiles listed for the call's head dim."""
    if role != "dkdv":
        decode = args["T_BUCKET"] * args["GROUP"] <= DECODE_ROWS
        if (tile.held <= DECODE_ROWS) != decode:
            return False
        if decode:
            return True
    return tables is None or tile in tables[_head_dim_class(args["BLOCK_D"])]


def _descriptor_blocks(nargs: dict) -> None:
    """Autotune pre-hook: a descriptor's block is one tile of the configuration at hand."""
    for name, rows in (("K_DESC", "BLOCK_N"), ("V_DESC", "BLOCK_N"), ("Q_DESC", "BLOCK_M"),
                       ("DO_DESC", "BLOCK_M")):  # fmt: skip
        desc = nargs.get(name)
        if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


def autotuned(kernel, role: str, tiles: list[Tile] | None = None, do_bench=None):
    """``kernel`` wrapped in triton.autotune over ``tiles`` (default: GPU_TILES[role] for
    every head dim and DECODE_TILES on a GPU, the one INTERPRET_TILES configuration in the
    interpreter, which is never timed), pruned per call by tuning.prune and _keep_tile.
    ``do_bench`` replaces Triton's timer (tests)."""
    tables = None
    if tiles is None and _INTERPRET:
        tiles = INTERPRET_TILES[role]
    elif tiles is None:
        tables = GPU_TILES[role]
        tiles = [t for table in tables.values() for t in table] + DECODE_TILES[role]
    keep = functools.partial(_keep_tile, role=role, tables=tables)
    rank = functools.partial(_rank_tile, role=role, tables=tables)
    return autotune(kernel, role, tiles, AUTOTUNE_KEY, do_bench, keep, rank, _descriptor_blocks)


# The @triton.jit kernels by role, and the autotuned wrappers the launches look up (tests
# replace them).
JIT_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
TUNED_KERNELS = {role: autotuned(kernel, role) for role, kernel in JIT_KERNELS.items()}


def _programs_per_sm() -> int:
    value = os.environ.get(PROGRAMS_ENV, "0")
    if not value.isdigit():
        raise ValueError(f"{PROGRAMS_ENV}={value!r} is not valid; use an integer >= 0 "
                         "(0: one program per tile)")  # fmt: skip
    return int(value)


def _programs_cap(device: torch.device) -> int | None:
    """How many programs a persistent launch may start (None: one program per tile): a few
    in the interpreter, GPT_FLASH_PROGRAMS_PER_SM per multiprocessor on a GPU if set."""
    if _INTERPRET:
        return _INTERPRET_PROGRAMS
    per_sm = _programs_per_sm()
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count or None


def _grid(n_rows: int, block: str, n_bh: int, cap: int | None):
    """1-D grid over the tiles of n_bh (batch, kv head) pairs, at most ``cap`` programs."""

    def grid(meta):
        tiles = triton.cdiv(n_rows, meta[block]) * n_bh
        return (tiles if cap is None else min(tiles, cap),)

    return grid


def _tma_ready(*tensors: Tensor) -> bool:
    """Whether the copy engine can read these (B, heads, length, D) tensors: a Triton with
    tensor descriptors, a Hopper or newer GPU (or the interpreter), a contiguous last dim,
    16-byte aligned base and strides."""
    if TensorDescriptor is None or not _TMA_ENABLED:
        return False
    x = tensors[0]
    if not _INTERPRET and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


def _descriptors(use_tma: bool, *tensors: Tensor) -> list:
    """A descriptor per tensor (its block set per configuration by _descriptor_blocks),
    or the tensors themselves when the kernels load through pointers."""
    if not use_tma:
        return list(tensors)
    tile_d = block_d(tensors[0].shape[-1])
    return [
        TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, tile_d]) for t in tensors
    ]


# --------------------------------------------------------------------------------------
# Launches; gpt.kernels.attention_op makes them custom ops
# --------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, o: Tensor, lse: Tensor):
    """Fills O (B, H, T, D) and the base-2 log-sum-exp L (B, H, T)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    use_tma = _tma_ready(k, v)
    k_desc, v_desc = _descriptors(use_tma, k, v)
    cap = _programs_cap(q.device)
    TUNED_KERNELS["fwd"][_grid(T * group, "BLOCK_M", B * H_kv, cap)](
        q, k_desc, v_desc, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        B, H, H_kv, T, S, D,
        scale * LOG2E,
        tuning.length_bucket(T), tuning.length_bucket(S),
        PERSISTENT=cap is not None, GROUP=group, IS_CAUSAL=causal, USE_TMA=use_tma,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d(D),
    )  # fmt: skip


def _backward(do, q, k, v, lse, delta, causal: bool, scale: float, dq, dk, dv):
    """Fills dQ, dK, dV, given L and delta = rowsum(dO * O)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    tile_d = block_d(D)
    precision = dot_precision(q.dtype)
    key = (tuning.length_bucket(T), tuning.length_bucket(S))
    qdo_tma = _tma_ready(q, do)
    q_desc, do_desc = _descriptors(qdo_tma, q, do)
    cap = _programs_cap(q.device)
    TUNED_KERNELS["dkdv"][_grid(S, "BLOCK_N", B * H_kv, cap)](
        q_desc, do_desc, q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        B, H, H_kv, T, S, D,
        scale * LOG2E, scale, *key,
        PERSISTENT=cap is not None, GROUP=group, IS_CAUSAL=causal, USE_TMA=qdo_tma,
        DOT_PRECISION=precision,
        BLOCK_D=tile_d,
    )  # fmt: skip
    kv_tma = _tma_ready(k, v)
    k_desc, v_desc = _descriptors(kv_tma, k, v)
    TUNED_KERNELS["dq"][_grid(T * group, "BLOCK_M", B * H_kv, cap)](
        q, k_desc, v_desc, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        B, H, H_kv, T, S, D,
        scale * LOG2E, scale, *key,
        PERSISTENT=cap is not None, GROUP=group, IS_CAUSAL=causal, USE_TMA=kv_tma,
        DOT_PRECISION=precision,
        BLOCK_D=tile_d,
    )  # fmt: skip


# gpt::flash_attention_packed_gqa_fwd, _bwd
OP = AttentionOp("flash_attention_packed_gqa", _forward, _backward)


def flash_attention_packed_gqa(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
) -> Tensor:
    """gpt.kernels.flash_attention.flash_attention, restructured (module docstring): same
    contract, same results up to rounding order."""
    return OP(q, k, v, causal, scale)
