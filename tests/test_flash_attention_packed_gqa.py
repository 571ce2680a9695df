"""Tests for the packed-GQA kernel (gpt.kernels.flash_attention_packed_gqa, backend
`triton-packed-gqa`; `triton-hopper` is its old name, still accepted).

Without a GPU these run in the Triton interpreter (tests/conftest.py), where both load paths
run: tensor descriptors (the copy engine's on a GPU) and pointer loads. The interpreter also
caps the launch at a few programs, so every case with more tiles runs the persistent loop.
The reference is attention from its definition in float64 (tests/kernel_testing.py).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_testing import (
    DEVICE,
    NAMES,
    check_against_reference,
    forward_backward,
    make_inputs,
)

from gpt.kernels import flash_attention_packed_gqa as fp
from gpt.kernels.flash_attention_packed_gqa import flash_attention_packed_gqa

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(autouse=True)
def quick_tuning(monkeypatch):
    """One configuration per kernel and key on a GPU: the tests check results, not speed."""
    monkeypatch.setenv("GPT_FLASH_TUNE", "quick")


# (T, S, D, causal, group, H_kv, B, dtype, layout). Every T, D and group meets causal and
# full; group 3 packs rows across tile edges unevenly; D = 20 in float16 has 40-byte rows,
# too narrow for tensor descriptors (pointer loads); T = 129 x group 4 makes 17 tiles for 3
# programs; (50, 93) is a causal T < S (bottom-right mask), (70, 23) cross-attention T > S.
CASES = [
    (1, 1, 16, True, 1, 1, 2, torch.float32, "bhtd"),
    (1, 70, 64, False, 4, 2, 1, torch.float16, "bthd"),
    (17, 17, 40, True, 3, 1, 1, torch.float32, "bhtd"),
    (17, 17, 20, False, 2, 2, 2, torch.float16, "bhtd"),
    (64, 64, 32, True, 2, 2, 1, torch.float16, "bthd"),
    (64, 64, 128, False, 1, 1, 1, torch.float32, "bhtd"),
    (129, 129, 16, True, 4, 1, 1, torch.float32, "bthd"),
    (129, 129, 64, False, 3, 1, 1, torch.float16, "bhtd"),
    (200, 200, 64, True, 1, 2, 1, torch.float16, "bhtd"),
    (100, 100, 128, True, 2, 1, 1, torch.float32, "bthd"),
    (50, 93, 32, True, 2, 1, 1, torch.float32, "bhtd"),
    (70, 23, 32, False, 2, 1, 1, torch.float32, "bthd"),  # more queries than keys
]


def _case_id(case) -> str:
    T, S, D, causal, group, H_kv, B, dtype, layout = case
    mask = "causal" if causal else "full"
    return f"T{T}-S{S}-D{D}-{mask}-g{group}-Hkv{H_kv}-B{B}-{str(dtype)[6:]}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(case):
    T, S, D, causal, group, H_kv, B, dtype, layout = case
    q, k, v, do = make_inputs(B, H_kv * group, H_kv, T, S, D, dtype, layout, seed=T * D)
    scale = 0.3 if D == 128 else None
    check_against_reference(flash_attention_packed_gqa, q, k, v, do, causal, scale)


def test_descriptor_and_pointer_paths_agree_exactly(monkeypatch):
    """The same inputs through tensor descriptors and through pointer loads: the same tiles
    in the same order, so bit-identical O, dQ, dK, dV."""
    q, k, v, do = make_inputs(1, 4, 2, 45, 45, 32, torch.float32, "bthd", seed=7)
    assert fp._tma_ready(q, k, v, do) == (fp.TensorDescriptor is not None)
    tma = forward_backward(flash_attention_packed_gqa, q, k, v, do, True, None)
    monkeypatch.setattr(fp, "_TMA_ENABLED", False)
    assert not fp._tma_ready(q, k, v, do)
    pointers = forward_backward(flash_attention_packed_gqa, q, k, v, do, True, None)
    for name, a, b in zip(NAMES, tma, pointers, strict=True):
        assert torch.equal(a, b), name


def test_tensor_descriptors_only_where_the_copy_engine_can_read():
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert fp._tma_ready(x)
    assert fp._tma_ready(x.half()[..., :12])  # 12 columns of 32-byte rows: aligned strides
    narrow = torch.randn(1, 2, 8, 12, device=DEVICE, dtype=torch.float16)
    assert not fp._tma_ready(narrow)  # 24-byte rows: strides not 16-byte aligned
    assert not fp._tma_ready(x.transpose(2, 3))  # last dim not contiguous
    shifted = torch.randn(1 * 2 * 8 * 16 + 1, device=DEVICE)[1:].view(1, 2, 8, 16)
    assert not fp._tma_ready(shifted)  # base 4 bytes past an aligned address


def test_persistent_and_one_program_per_tile_agree_exactly(monkeypatch):
    """3 programs looping over the tiles (the interpreter's default), 1 program doing all of
    them, and the GPU's default of one program per tile (no loop compiled) agree bit for bit."""
    q, k, v, do = make_inputs(1, 6, 2, 70, 70, 16, torch.float32, seed=5)
    three = forward_backward(flash_attention_packed_gqa, q, k, v, do, True, None)
    for cap in (1, None):
        monkeypatch.setattr(fp, "_INTERPRET_PROGRAMS", cap)
        other = forward_backward(flash_attention_packed_gqa, q, k, v, do, True, None)
        for name, a, b in zip(NAMES, three, other, strict=True):
            assert torch.equal(a, b), f"{name}, programs {cap}"


@triton.jit
def _record_order(OUT, n_bh, n_tiles_per_bh, HEAVIEST_LAST: tl.constexpr):
    for tile in range(0, n_bh * n_tiles_per_bh):
        i, bh = fp._tile_coords(tile, n_bh, n_tiles_per_bh, HEAVIEST_LAST)
        tl.store(OUT + 2 * tile, i)
        tl.store(OUT + 2 * tile + 1, bh)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the launch order in the interpreter")
@pytest.mark.parametrize("heaviest_last", [True, False])
def test_launch_order_heads_fastest_heaviest_first(heaviest_last):
    n_bh, n_tiles = 3, 4
    out = torch.empty(n_bh * n_tiles * 2, dtype=torch.int32)
    _record_order[(1,)](out, n_bh, n_tiles, heaviest_last)
    order = [tuple(pair) for pair in out.view(-1, 2).tolist()]
    assert sorted(order) == [(i, bh) for i in range(n_tiles) for bh in range(n_bh)]
    assert [bh for _, bh in order[:n_bh]] == list(range(n_bh))  # heads vary fastest
    first = [i for i, _ in order[::n_bh]]
    assert first == (list(range(n_tiles))[::-1] if heaviest_last else list(range(n_tiles)))


def test_bad_input_raises():
    q, k, v, _ = make_inputs(1, 2, 1, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="T <= S"):
        flash_attention_packed_gqa(q, k, v, causal=True)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_packed_gqa(*make_inputs(1, 3, 2, 8, 8, 16, torch.float32)[:3])


def test_bad_program_count_names_the_variable(monkeypatch):
    monkeypatch.setenv(fp.PROGRAMS_ENV, "many")
    with pytest.raises(ValueError, match="GPT_FLASH_PROGRAMS_PER_SM='many'"):
        fp._programs_per_sm()


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    q, k, v, do = make_inputs(1, 4, 2, 17, 17, 16, torch.float32, layout="bthd")
    fwd = torch.ops.gpt.flash_attention_packed_gqa_fwd.default
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(fwd, (q, k, v, True, 0.25))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    bwd = torch.ops.gpt.flash_attention_packed_gqa_bwd.default
    torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


def test_model_with_triton_packed_gqa_matches_naive():
    """A 2-layer GQA model: logits and every parameter's gradient agree across backends."""
    from gpt import GPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      dropout=0.0, bias=True, attention="naive")  # fmt: skip
    model = GPT(cfg).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 64, (2, 24), generator=gen).to(DEVICE) for _ in range(2))
    results = []
    for backend in ("naive", "triton-packed-gqa"):
        model.set_attention(backend)
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------
# GPU only: bfloat16 (broken in the interpreter), long and ragged sequences, the shapes
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "B, H, H_kv, T, S, D, causal",
    [
        (2, 8, 2, 2048, 2048, 128, True),
        (2, 8, 8, 2048, 2048, 64, False),
        (1, 32, 8, 1000, 1000, 128, True),  # issue 17's GQA 32/8 and ragged T = 1000
        (1, 4, 1, 1, 1, 128, True),
        (1, 12, 4, 1, 777, 64, True),  # a decode step: 3 heads per group in one tile
        (1, 8, 2, 300, 1300, 128, True),  # chunked prefill: bottom-right mask
        (1, 4, 4, 1000, 1000, 256, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_low_precision(B, H, H_kv, T, S, D, causal, dtype):
    q, k, v, do = make_inputs(B, H, H_kv, T, S, D, dtype, layout="bthd", seed=T + D)
    check_against_reference(flash_attention_packed_gqa, q, k, v, do, causal, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_float32_and_descriptors_on_hopper():
    """float32 (IEEE products) within 1e-4; on compute capability 9+ the model's transposed
    bf16 layout goes through tensor descriptors."""
    q, k, v, do = make_inputs(1, 4, 2, 1024, 1024, 64, torch.float32, layout="bthd")
    check_against_reference(flash_attention_packed_gqa, q, k, v, do, True, None)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert fp._tma_ready(*(x.bfloat16() for x in (q, k, v))) == hopper
