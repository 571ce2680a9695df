"""The parallel compile warm-up (gpt.kernels.warmup): which compiles it plans. The compiling
itself needs a GPU (a gpu-marked test below)."""

from __future__ import annotations

import pytest
import torch

from gpt.kernels import warmup

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _plan(shapes, masks=("causal",)):
    return warmup.plan(["triton", "triton-packed-gqa"], shapes, list(masks), ["fp32"], DEVICE)


def test_plan_covers_every_kernel_once_per_distinct_compile():
    jobs = _plan([(2, 4, 2, 16, 16)])
    kernels = sorted((module, role) for module, role, _, _ in jobs)
    assert kernels == [
        ("flash_attention", "dkdv"), ("flash_attention", "dq"), ("flash_attention", "fwd"),
        ("flash_attention_packed_gqa", "dkdv"), ("flash_attention_packed_gqa", "dq"),
        ("flash_attention_packed_gqa", "fwd"),
    ]  # fmt: skip
    for _, _, specs, options in jobs:
        assert options["IS_CAUSAL"] is True and "num_warps" in options and "BLOCK_M" in options
        assert ("tensor", "float32") in specs
    # a batch of 3 instead of 2 compiles to the same code; the full mask does not
    assert len(_plan([(2, 4, 2, 16, 16), (3, 4, 2, 16, 16)])) == len(jobs)
    assert len(_plan([(2, 4, 2, 16, 16)], masks=("causal", "full"))) == 2 * len(jobs)


def test_descriptor_arguments_are_planned_with_their_tile():
    """The packed-GQA kernels' descriptors carry the block of the configuration they serve."""
    jobs = [j for j in _plan([(1, 2, 1, 32, 16)]) if j[0] == "flash_attention_packed_gqa"]
    for _, role, specs, options in jobs:
        descs = [s for s in specs if isinstance(s, tuple) and s[0] == "desc"]
        assert len(descs) == 2, role  # K and V, or Q and dO
        rows = options["BLOCK_M"] if role == "dkdv" else options["BLOCK_N"]
        assert all(d[4] == (1, 1, rows, options["BLOCK_D"]) for d in descs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_to_run_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        warmup.main(["--shapes", "1x2x64x64"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@needs_gpu
def test_gpu_warmup_compiles_every_planned_kernel():
    assert warmup.main(["--shapes", "1x4/2x256x64", "--masks", "causal", "--jobs", "2"]) == 0


@pytest.mark.parametrize(
    "text, shape",
    [("4x16x4096x128", (4, 16, 16, 4096, 128)), ("4x32/8x4096x128", (4, 32, 8, 4096, 128)),
     ("1x2/1x48x16", (1, 2, 1, 48, 16)), ("1x1x1x1", (1, 1, 1, 1, 1))],
)  # fmt: skip
def test_parse_shape_reads_b_h_hkv_t_d(text, shape):
    assert warmup.parse_shape(text) == shape


@pytest.mark.parametrize(
    "text, match",
    [("4x16x4096", "is not BxHxTxD"), ("axbxcxd", "is not BxHxTxD"), ("4x16/0x64x64", ">= 1"),
     ("0x1x8x8", ">= 1"), ("4x3/2x64x64", "H a multiple of H_kv")],
)  # fmt: skip
def test_parse_shape_refuses_what_is_not_a_shape(text, match):
    with pytest.raises(ValueError, match=match):
        warmup.parse_shape(text)
