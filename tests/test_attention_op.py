"""The attention kernels' shared plumbing (gpt.kernels.attention_op): input checks and their
messages, the delta kernel against rowsum(dO * O), the fake (shape-only) implementations, and
the custom-op registration of an AttentionOp built here from float64 PyTorch launches, so
that what is tested is the plumbing, not a kernel."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import explicit_attention, make_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

from gpt.kernels import attention_op
from gpt.kernels.attention_op import AttentionOp, backward_delta, check_inputs


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: [x.double() for x in make_inputs(1, 2, 1, 8, 8, 16, torch.float32)[:3]],
         ValueError, r"dtype torch.float64 unsupported; use float16, bfloat16 or float32"),
        (lambda: make_inputs(1, 2, 1, 8, 8, 512, torch.float32)[:3], ValueError,
         r"head dim 512 unsupported; at most 256"),
        (lambda: make_inputs(1, 3, 2, 8, 8, 16, torch.float32)[:3], ValueError, "multiple"),
        (lambda: make_inputs(1, 2, 1, 9, 8, 16, torch.float32)[:3], ValueError,
         r"causal attention needs T <= S .*got T=9, S=8"),
        (lambda: make_inputs(1, 2, 1, 0, 0, 16, torch.float32)[:3], ValueError,
         r"empty sequence: T=0, S=0"),
        (lambda: (lambda q, k, v: (q, k.half(), v))(*make_inputs(1, 2, 1, 8, 8, 16,
                                                                  torch.float32)[:3]),
         ValueError, r"q, k, v must share a dtype; got torch.float32, torch.float16"),
    ],
    ids=["float64", "D512", "heads", "causal-lengths", "empty", "mixed-dtypes"],
)  # fmt: skip
def test_bad_inputs_raise_with_the_reason(make, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        check_inputs(q, k, v, True, "my_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_valid_inputs_pass(dtype):
    q, k, v, _ = make_inputs(1, 4, 2, 5, 9, 256, dtype, layout="bthd")  # T < S, causal
    check_inputs(q, k, v, True, "my_kernel")
    check_inputs(*make_inputs(1, 2, 1, 9, 5, 16, dtype)[:3], False, "my_kernel")  # T > S


def test_cpu_tensors_without_interpreter_raise_runtime_error(monkeypatch):
    """Outside the interpreter, CPU tensors are a broken environment; the message names the
    calling kernel and the way out."""
    monkeypatch.setattr(attention_op, "_INTERPRET", False)
    q, k, v, _ = make_inputs(1, 2, 1, 8, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match=r"my_kernel needs CUDA tensors.*TRITON_INTERPRET=1"):
        check_inputs(q.cpu(), k.cpu(), v.cpu(), True, "my_kernel")


@pytest.mark.parametrize("T, D", [(1, 16), (45, 20), (70, 64)])
def test_backward_delta_is_rowsum_of_do_times_o(T, D):
    """Rows spanning several programs, padded head dims, a transposed layout."""
    o, _, _, do = make_inputs(2, 3, 3, T, T, D, torch.float32, layout="bthd", seed=T)
    delta = backward_delta(o, do)
    assert delta.shape == (2, 3, T) and delta.dtype == torch.float32 and delta.is_contiguous()
    expected = (o.double() * do.double()).sum(-1)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)


def test_block_d_and_dot_precision():
    assert [attention_op.block_d(d) for d in (1, 16, 20, 64, 65, 256)] == [16, 16, 32, 64, 128, 256]
    assert attention_op.dot_precision(torch.float32) == "ieee"
    assert attention_op.dot_precision(torch.bfloat16) == "tf32"


def test_fake_shapes_are_contiguous_and_typed():
    """The fake implementations under FakeTensorMode: O like q, L (B, H, T) float32, and
    dQ, dK, dV like q, k, v, all contiguous whatever the inputs' strides."""
    with FakeTensorMode():
        q = torch.empty(2, 7, 4, 16, dtype=torch.float16).transpose(1, 2)  # (2, 4, 7, 16)
        k = torch.empty(2, 2, 9, 16, dtype=torch.float16)
        v = torch.empty(2, 2, 9, 16, dtype=torch.float16)
        o, lse = attention_op.forward_outputs(q, k, v, True, 0.25)
        assert o.shape == (2, 4, 7, 16) and o.dtype == torch.float16 and o.is_contiguous()
        assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
        dq, dk, dv = attention_op.backward_outputs(o, q, k, v, o, lse, True, 0.25)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert all(x.is_contiguous() and x.dtype == torch.float16 for x in (dq, dk, dv))


# --------------------------------------------------------------------------------------
# An AttentionOp over PyTorch launches: the registration, autograd and fake tensors
# --------------------------------------------------------------------------------------


def _probabilities(q, k, causal, scale):
    """P (B, H, T, S) in float64, each K/V head repeated for its query group."""
    k64 = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    s = q.double() @ k64.transpose(-2, -1) * scale
    if causal:  # bottom-right: query i sees keys j <= i + S - T
        T, S = q.shape[2], k.shape[2]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    return s


def _forward(q, k, v, causal, scale, o, lse):
    """Fills O and the base-2 log-sum-exp from the explicit formulas (float64 inside)."""
    s = _probabilities(q, k, causal, scale)
    lse.copy_(torch.logsumexp(s, -1) / math.log(2.0))
    o.copy_(explicit_attention(q, k, v, causal, scale))


def _backward(do, q, k, v, lse, delta, causal, scale, dq, dk, dv):
    """Fills dQ, dK, dV: the softmax backward written out (FlashAttention-2, Algorithm 2) in
    float64, with the L and delta = rowsum(dO * O) it is given, as a kernel would."""
    group = q.shape[1] // k.shape[1]
    s = _probabilities(q, k, causal, scale)
    p = torch.exp2(s / math.log(2.0) - lse.double()[..., None])  # P = exp(S - L), normalised
    do64, v64 = do.double(), v.repeat_interleave(group, dim=1).double()
    ds = p * (do64 @ v64.transpose(-2, -1) - delta.double()[..., None])
    k64 = k.repeat_interleave(group, dim=1).double()
    B, H_kv, S, D = k.shape
    dq.copy_(ds @ k64 * scale)
    dk.copy_((ds.transpose(-2, -1) @ q.double() * scale).view(B, H_kv, group, S, D).sum(2))
    dv.copy_((p.transpose(-2, -1) @ do64).view(B, H_kv, group, S, D).sum(2))


OP = AttentionOp("attention_op_test", _forward, _backward)


def test_registers_both_custom_ops():
    assert torch.ops.gpt.attention_op_test_fwd.default is not None
    assert torch.ops.gpt.attention_op_test_bwd.default is not None
    schema = str(torch.ops.gpt.attention_op_test_fwd.default._schema)
    assert "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)" in schema


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch, on a transposed
    GQA layout."""
    q, k, v, do = make_inputs(1, 4, 2, 6, 9, 16, torch.float32, layout="bthd")
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.gpt.attention_op_test_fwd.default, (q, k, v, True, 0.25))
    out, lse = OP.forward(q.detach(), k.detach(), v.detach(), True, 0.25)
    bwd = torch.ops.gpt.attention_op_test_bwd.default
    torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


@pytest.mark.parametrize("causal", [True, False])
def test_call_defaults_the_scale_and_differentiates(causal):
    """Calling the op: 1/sqrt(D) by default, or the scale given; gradients from the
    backward op with the forward's mask and scale, equal to autograd through the formulas."""
    q, k, v, do = make_inputs(1, 4, 2, 5, 8, 16, torch.float32, seed=3)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    for scale, given in [(0.25, None), (0.5, 0.5)]:
        out = OP(q, k, v, causal, given)
        expected_out = explicit_attention(q, k, v, causal, scale)
        torch.testing.assert_close(out, expected_out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        expected = torch.autograd.grad(expected_out, (q, k, v), do)
        for name, g, e in zip(("dQ", "dK", "dV"), grads, expected, strict=True):
            torch.testing.assert_close(g, e, msg=name)


def test_call_checks_inputs_in_the_ops_name(monkeypatch):
    q, k, v, _ = make_inputs(1, 4, 2, 5, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="T <= S"):
        OP(q, k[:, :, :3], v[:, :, :3], causal=True)
    monkeypatch.setattr(attention_op, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="attention_op_test needs CUDA tensors"):
        OP(q.cpu(), k.cpu(), v.cpu())
