"""Tests for the Triton FlashAttention-2 kernel (gpt.kernels.flash_attention).

Without a GPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow, so the shape grid is a covering design rather than a Cartesian product: every
value of every axis appears, every (T, D) pair appears once, and the expensive cases are few.
The reference is attention computed from its definition in float64 on the same inputs, with
an explicit causal mask (tests/kernel_testing.py).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import DEVICE, NAMES, check_against_reference, forward_backward, make_inputs

from gpt.kernels.flash_attention import flash_attention
from gpt.kernels.flash_attention_packed_gqa import flash_attention_packed_gqa

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

SEQ_LENS = [1, 17, 64, 127, 128, 129, 300]
HEAD_DIMS = [16, 32, 64, 128]
GROUPS = [1, 2, 4]
DTYPES = [torch.float32, torch.float16]


def _covering_cases() -> list[tuple]:
    """One case per (T, D) pair (28 cases); causal, GQA group and dtype are rotated so that
    every pair of axes meets in all combinations (checked below). Some cases also use a
    transposed (non-contiguous) layout, batch 2, two K/V heads or a given scale."""
    cases = []
    for i, T in enumerate(SEQ_LENS):
        for j, D in enumerate(HEAD_DIMS):
            causal = (i + j) % 2 == 0
            group = GROUPS[(i + 2 * j) % 3]
            dtype = DTYPES[(i // 2 + j) % 2]
            n = len(cases)
            batch = 2 if T * D <= 64 * 64 and n % 3 == 0 else 1
            kv_heads = 2 if T <= 128 and n % 2 == 0 else 1
            layout = "bthd" if n % 5 in (1, 3) else "bhtd"
            scale = 0.3 if n % 5 == 2 else None
            cases.append((T, D, causal, group, dtype, batch, kv_heads, layout, scale))
    return cases


CASES = _covering_cases()


def _case_id(case) -> str:
    T, D, causal, group, dtype, batch, kv_heads, layout, scale = case
    kind = "causal" if causal else "full"
    s = "" if scale is None else f"-scale{scale}"
    return f"T{T}-D{D}-{kind}-g{group}-{str(dtype)[6:]}-B{batch}-Hkv{kv_heads}-{layout}{s}"


def _check_against_reference(q, k, v, do, causal, scale):
    check_against_reference(flash_attention, q, k, v, do, causal, scale)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(case):
    T, D, causal, group, dtype, B, H_kv, layout, scale = case
    q, k, v, do = make_inputs(B, H_kv * group, H_kv, T, T, D, dtype, layout)
    _check_against_reference(q, k, v, do, causal, scale)


def test_covering_design_is_pairwise_complete():
    """Every pair of axes (T, D, causal, GQA group, dtype) meets in every combination of
    values somewhere in the grid above, and the expensive cases stay few."""
    axes = [SEQ_LENS, HEAD_DIMS, [True, False], GROUPS, DTYPES]
    for a, b in itertools.combinations(range(len(axes)), 2):
        have = {(c[a], c[b]) for c in CASES}
        assert have == set(itertools.product(axes[a], axes[b])), (a, b)
    assert len([c for c in CASES if c[0] >= 127 and c[1] == 128]) <= 4
    # GQA with several K/V heads (catches a wrong head mapping), transposed and batched too
    assert any(c[3] > 1 and c[6] > 1 and c[7] == "bthd" and c[5] > 1 for c in CASES)
    assert {c[4] for c in CASES if c[7] == "bthd"} == set(DTYPES)
    assert {c[2] for c in CASES if c[7] == "bthd"} == {True, False}


def test_cross_attention_lengths_differ():
    """Non-causal attention with S != T (and S not a multiple of any block size)."""
    q, k, v, do = make_inputs(1, 2, 1, 17, 33, 32, torch.float32)
    _check_against_reference(q, k, v, do, causal=False, scale=None)


# (T, S, GQA group, D, dtype, layout): causal with T < S, the mask aligned bottom-right (query
# i sees keys <= i + S - T): a decode step (T = 1), chunked prefill after a cache of odd
# length, a group of 3 heads, T a multiple of the blocks but S - T not.
BOTTOM_RIGHT = [
    (1, 1, 1, 16, torch.float32, "bhtd"),
    (1, 37, 4, 16, torch.float32, "bthd"),
    (5, 37, 2, 32, torch.float16, "bhtd"),
    (17, 33, 1, 32, torch.float32, "bthd"),
    (31, 100, 3, 16, torch.float32, "bhtd"),
    (32, 45, 2, 64, torch.float16, "bthd"),
]
KERNELS = {"triton": flash_attention, "triton-packed-gqa": flash_attention_packed_gqa}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", BOTTOM_RIGHT, ids=lambda c: f"T{c[0]}-S{c[1]}-g{c[2]}-D{c[3]}")
def test_causal_bottom_right_matches_float64(kernel, case):
    T, S, group, D, dtype, layout = case
    q, k, v, do = make_inputs(2, 2 * group, 2, T, S, D, dtype, layout, seed=T + S)
    check_against_reference(KERNELS[kernel], q, k, v, do, causal=True, scale=None)


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_bottom_right_is_the_tail_of_full_causal(kernel):
    """T queries after S - T cached keys see what the last T rows of a causal pass over all
    S positions see: a KV cache (or a chunked prefill) changes nothing."""
    fn = KERNELS[kernel]
    q, k, v, _ = make_inputs(1, 4, 2, 29, 29, 16, torch.float32, seed=3)
    whole = fn(q, k, v, causal=True)
    for T in (1, 7):
        torch.testing.assert_close(fn(q[:, :, -T:], k, v, causal=True), whole[:, :, -T:],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 17])
def test_no_nan_in_single_token_and_padded_tail(T, dtype):
    """T = 1 (one visible key per row) and a tail tile that is mostly padding; large scores
    (|s| ~ 1e3) check that the online softmax never overflows."""
    for causal in (True, False):
        q, k, v, do = make_inputs(1, 2, 1, T, T, 16, dtype)
        outs = forward_backward(flash_attention, q * 8, k * 8, v, do, causal, None)
        for name, x in zip(NAMES, outs, strict=True):
            assert torch.isfinite(x).all(), f"{name} has NaN/inf (T={T}, causal={causal})"


@pytest.mark.parametrize("D", [40, 256])
def test_other_head_dims(D):
    """D = 40 is padded to a 64-wide tile and masked; 256 is the largest supported."""
    q, k, v, do = make_inputs(1, 2, 2, 20, 20, D, torch.float32)
    _check_against_reference(q, k, v, do, causal=True, scale=None)


def test_gqa_gradient_is_sum_over_group():
    """dK for one shared K/V head equals the sum of dK over repeated, independent heads."""
    q, k, v, do = make_inputs(1, 4, 1, 17, 17, 16, torch.float32)
    _, _, dk, dv = forward_backward(flash_attention, q, k, v, do, True, None)
    k4, v4 = k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1)
    _, _, dk4, dv4 = forward_backward(flash_attention, q, k4, v4, do, True, None)
    torch.testing.assert_close(dk, dk4.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, dv4.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: make_inputs(1, 2, 1, 8, 8, 16, torch.float32)[:3], None),
        (lambda: [x.double() for x in make_inputs(1, 2, 1, 8, 8, 16, torch.float32)[:3]], "dtype"),
        (lambda: make_inputs(1, 2, 1, 8, 8, 512, torch.float32)[:3], "head dim"),
        (lambda: make_inputs(1, 3, 2, 8, 8, 16, torch.float32)[:3], "multiple"),
        (lambda: make_inputs(1, 2, 1, 9, 8, 16, torch.float32)[:3], "T <= S"),
    ],
    ids=["ok", "float64", "D512", "heads", "causal-lengths"],
)
def test_bad_input_raises_value_error(make, match):
    q, k, v = make()
    if match is None:
        flash_attention(q, k, v)  # the valid baseline of this table
        return
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


def test_mixed_dtypes_raise_value_error():
    q, k, v, _ = make_inputs(1, 2, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.half(), v)


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    q, k, v, do = make_inputs(1, 2, 1, 17, 17, 16, torch.float32, layout="bthd")
    fwd = torch.ops.gpt.flash_attention_fwd.default
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(fwd, (q, k, v, True, 0.25))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    bwd = torch.ops.gpt.flash_attention_bwd.default
    torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


def test_torch_compile_fullgraph_runs_kernel():
    """torch.compile (Inductor, no graph breaks) treats the op as an opaque call, and the
    compiled forward and backward match eager."""
    q, k, v, do = make_inputs(1, 4, 2, 17, 17, 16, torch.float32)

    def attend(q, k, v, causal=True, scale=None):
        return flash_attention(torch.tanh(q), k, v, causal=causal, scale=scale) * 2

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)
    ours = forward_backward(compiled, q, k, v, do, True, None)
    eager = forward_backward(attend, q, k, v, do, True, None)
    for name, a, b in zip(NAMES, ours, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# Compiles every kernel with Triton's real compiler (TTIR -> PTX -> cubin with the ptxas bundled
# in the wheel) for an H100 (sm_90), no GPU needed, and reads the cubins' resource usage
# (gpt.kernels.resources). The interpreter is more permissive than the compiler, so this
# catches code that interprets but would not compile. It runs in a subprocess because
# TRITON_INTERPRET=1 replaces triton.language in this one. Quick mode: each kernel's first
# candidate, the one the GPU tests use.


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_h100(tmp_path, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPT_FLASH_TUNE"] = "quick"
    out = tmp_path / "resources.json"
    head_dims = ["64", "128"] if dtype == "bf16" else ["32"]
    run = subprocess.run(
        [sys.executable, "-m", "gpt.kernels.resources", "--dtype", dtype, "--head-dims",
         *head_dims, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 3 * len(head_dims)  # 2 backends x 3 kernels x head dims
    for row in rows:
        assert "error" not in row and row["fits"], row
        # triton-packed-gqa's tables hold no tile that spills in 16-bit dtypes; float32's
        # IEEE products run on FMA units with operands in registers and spill in both kernels
        if row["backend"] == "triton-packed-gqa" and dtype == "bf16":
            assert row["stack_bytes"] == 0, row


# --------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------


def _tiny_model(attention: str):
    from gpt import GPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
        dropout=0.0, bias=True, attention=attention,
    )  # fmt: skip
    return GPT(cfg).to(DEVICE)


def _logits_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_with_triton_matches_naive():
    """A 2-layer GQA model: logits and every parameter's gradient agree across backends."""
    model = _tiny_model("naive")
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 24), generator=gen).to(DEVICE)
    targets = torch.randint(0, 64, (2, 24), generator=gen).to(DEVICE)
    logits_ref, grads_ref = _logits_and_grads(model, idx, targets)
    model.set_attention("triton")
    logits, grads = _logits_and_grads(model, idx, targets)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_with_triton_runs():
    """torch.compile'd model using the kernel (Inductor on the CPU): a training step runs
    without graph breaks around the op and matches the eager model."""
    model = _tiny_model("triton")
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (1, 16), generator=gen).to(DEVICE)
    logits_eager, grads_eager = _logits_and_grads(model, idx, idx)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    logits, grads = _logits_and_grads(compiled, idx, idx)
    torch.testing.assert_close(logits, logits_eager, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_eager[name.removeprefix("_orig_mod.")], rtol=1e-4,
                                   atol=1e-5, msg=name)  # fmt: skip


# --------------------------------------------------------------------------------------
# GPU only: bfloat16 (broken in the interpreter), long sequences, autotuning
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_low_precision_long_sequence(dtype, D, causal):
    q, k, v, do = make_inputs(2, 8, 2, 2048, 2048, D, dtype, layout="bthd")
    _check_against_reference(q, k, v, do, causal, None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T, D", [(1, 128), (129, 128), (1000, 128), (4096, 128), (1000, 256)])
def test_gpu_bf16_ragged_and_long(T, D):
    q, k, v, do = make_inputs(1, 4, 1, T, T, D, torch.bfloat16)
    _check_against_reference(q, k, v, do, True, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_float32_within_1e4():
    """float32 uses IEEE products (not TF32), so the 1e-4 bound holds on hardware too."""
    q, k, v, do = make_inputs(1, 4, 2, 1024, 1024, 64, torch.float32)
    _check_against_reference(q, k, v, do, True, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_autotune_keys_on_length_dim_dtype_causal():
    """Each (T, D, dtype, causal) gets its own tuned configuration."""
    from gpt.kernels import flash_attention as fa

    before = len(fa.TUNED_KERNELS["fwd"].cache)
    seen = set()
    for T, D, dtype, causal in [
        (512, 64, torch.float16, True),
        (512, 64, torch.float16, False),
        (512, 128, torch.float16, True),
        (1024, 64, torch.float16, True),
        (512, 64, torch.bfloat16, True),
    ]:
        q, k, v, _ = make_inputs(1, 2, 1, T, T, D, dtype, seed=T + D)
        flash_attention(q, k, v, causal=causal)
        seen.add((T, D, dtype, causal))
    assert len(fa.TUNED_KERNELS["fwd"].cache) - before == len(seen)
    for config in fa.TUNED_KERNELS["fwd"].cache.values():
        assert config.kwargs["BLOCK_M"] >= 32 and config.kwargs["BLOCK_N"] >= 32


@pytest.mark.gpu
@needs_gpu
def test_gpu_model_bf16_matches_sdpa():
    """A bf16 model with the triton backend against the same model in float32: its error in
    the logits and in every parameter's gradient is at most 2x that of PyTorch's own sdpa in
    bf16 (the measured baseline of bf16 rounding), plus a hair for exact ties. Attention is
    sharpened (W_q, W_k x 10) so that a wrong softmax scale cannot hide in uniform weights."""
    import copy

    model = _tiny_model("sdpa")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 64 + 32] *= 10  # q and the 2 kv heads' k rows
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (4, 32), generator=gen).to(DEVICE)
    targets = torch.randint(0, 64, (4, 32), generator=gen).to(DEVICE)
    logits_32, grads_32 = _logits_and_grads(model, idx, targets)
    low = copy.deepcopy(model).to(torch.bfloat16)
    logits_sdpa, grads_sdpa = _logits_and_grads(low, idx, targets)
    low.set_attention("triton")
    logits_triton, grads_triton = _logits_and_grads(low, idx, targets)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert math.isfinite(err(logits_sdpa, logits_32))
    assert err(logits_triton, logits_32) <= 2 * err(logits_sdpa, logits_32) + 1e-6
    for name, g in grads_32.items():
        baseline = err(grads_sdpa[name], g)
        assert err(grads_triton[name], g) <= 2 * baseline + 1e-6 * g.abs().max().item(), name
