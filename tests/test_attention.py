"""Attention registry and the naive / sdpa backends against a float64 reference."""

import math

import pytest
import torch

from gpt.attention import (
    BackendUnavailable,
    attention_status,
    get_attention,
    naive_attention,
    register_attention,
    sdpa_attention,
)


def reference(q, k, v, causal, scale):
    """Float64 attention written out loop by loop over heads: a different computation path."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        s = q[:, h] @ k[:, h // groups].transpose(-1, -2) * scale  # (B, T, S)
        if causal:  # query i is position S - T + i: it sees keys 0..S - T + i
            S = k.shape[2]
            for i in range(T):
                s[:, i, S - T + i + 1 :] = float("-inf")
        out[:, h] = torch.softmax(s, -1) @ v[:, h // groups]
    return out


@pytest.mark.parametrize("fn", [naive_attention, sdpa_attention], ids=["naive", "sdpa"])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("D", [16, 24, 13])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_backend_matches_float64(fn, T, D, causal, kv_heads):
    torch.manual_seed(T * 100 + D)
    q = torch.randn(2, 4, T, D)
    k, v = torch.randn(2, kv_heads, T, D), torch.randn(2, kv_heads, T, D)
    scale = 1 / math.sqrt(D)
    out = fn(q, k, v, causal, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(
        out.double(), reference(q, k, v, causal, scale), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("fn", [naive_attention, sdpa_attention], ids=["naive", "sdpa"])
def test_float64_inputs_stay_float64(fn):
    """No float32 step inside: a float64 call agrees with the reference to float64 precision."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    out = fn(q, k, v, True, 0.35)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(q, k, v, True, 0.35), rtol=1e-12, atol=1e-12)


def test_non_causal_with_different_key_length():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expected = reference(q, k, v, False, 0.3)
    for fn in (naive_attention, sdpa_attention):
        out = fn(q, k, v, False, 0.3).double()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [naive_attention, sdpa_attention], ids=["naive", "sdpa"])
@pytest.mark.parametrize(
    "T, S", [(1, 1), (1, 9), (2, 3), (3, 17), (5, 5), (7, 8), (7, 64), (16, 33), (31, 32)]
)
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_causal_queries_after_cached_keys_are_bottom_right_aligned(fn, T, S, kv_heads):
    """T new queries after S - T cached keys (a KV-cache step): query i sees keys up to
    S - T + i, as if the T queries were the last rows of a causal (S, S) attention."""
    torch.manual_seed(T * 1000 + S)
    D = 12
    q_all = torch.randn(2, 4, S, D)
    k, v = torch.randn(2, kv_heads, S, D), torch.randn(2, kv_heads, S, D)
    out = fn(q_all[:, :, S - T :], k, v, True, 0.4)
    torch.testing.assert_close(
        out.double(), reference(q_all[:, :, S - T :], k, v, True, 0.4), rtol=1e-5, atol=1e-6
    )
    # the same rows of the full causal attention, computed another way
    torch.testing.assert_close(
        out.double(), reference(q_all, k, v, True, 0.4)[:, :, S - T :], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("T, S, kv_heads", [(2, 3, 4), (7, 64, 1), (16, 33, 2)])
def test_a_chunked_prefill_passes_no_mask_tensor_and_compiles_to_the_same(T, S, kv_heads):
    """Eager sdpa says bottom-right causal with PyTorch's CausalBias (no mask tensor: the
    fused kernels stay eligible on a GPU); compiled, where CausalBias cannot be built, with
    the explicit mask. Both give the float64 reference."""
    import gpt.attention

    torch.manual_seed(T + S)
    q = torch.randn(1, 4, T, 8)
    k, v = torch.randn(1, kv_heads, S, 8), torch.randn(1, kv_heads, S, 8)

    def no_mask(*args):
        raise AssertionError("eager sdpa built a mask tensor")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gpt.attention, "causal_mask", no_mask)
        eager = sdpa_attention(q, k, v, True, 0.5)
    compiled = torch.compile(sdpa_attention, fullgraph=True, dynamic=False)(q, k, v, True, 0.5)
    expected = reference(q.double(), k.double(), v.double(), True, 0.5)
    for out in (eager, compiled):
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_naive_returns_weights_that_are_causal_and_normalised():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    out, w = naive_attention(q, k, v, True, 0.5, return_weights=True)
    assert w.shape == (1, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6))
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(out, w @ v)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'flash3'.*naive.*sdpa.*triton"
    ):
        get_attention("flash3")


def test_unavailable_backend_says_why():
    def loader():
        raise BackendUnavailable("it needs a quantum computer")

    register_attention("test-unavailable", loader)
    try:
        assert attention_status()["test-unavailable"] == "it needs a quantum computer"
        with pytest.raises(ValueError, match=r"'test-unavailable' is unavailable.*quantum.*naive"):
            get_attention("test-unavailable")
    finally:
        from gpt.attention import _LOADERS

        del _LOADERS["test-unavailable"]


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 4, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)), "multiple of kv heads"),
        (((2, 4, 6, 8), (2, 4, 5, 8), (2, 4, 5, 8)), r"causal attention needs T <= S.*T=6, S=5"),
        (((2, 4, 5, 8), (2, 4, 5, 7), (2, 4, 5, 7)), "incompatible"),
        (((4, 5, 8), (4, 5, 8), (4, 5, 8)), "4-D"),
    ],
)
def test_bad_shapes_are_rejected(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    for fn in (naive_attention, sdpa_attention):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, True, 1.0)


def test_old_backend_name_is_an_unlisted_alias():
    """`triton-hopper` (the packed-GQA kernel's name before issue 23) still resolves, so
    configs and checkpoints that name it load, but the lists show only the current name."""
    from gpt.attention import ALIASES, attention_names, canonical_attention_name

    assert ALIASES == {"triton-hopper": "triton-packed-gqa"}
    assert canonical_attention_name("triton-hopper") == "triton-packed-gqa"
    assert canonical_attention_name("sdpa") == "sdpa"
    assert "triton-hopper" not in attention_names() and "triton-packed-gqa" in attention_names()
    assert "triton-hopper" not in attention_status()
    if attention_status()["triton-packed-gqa"] is None:  # it runs here (GPU or interpreter)
        assert get_attention("triton-hopper") is get_attention("triton-packed-gqa")
