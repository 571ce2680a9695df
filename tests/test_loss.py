"""The chunked LM-head cross-entropy (gpt/loss.py) against the plain path in float64: the
loss and both gradients over many shapes (T = 1, odd T, chunks that do not divide the
tokens, padded vocabularies, ignored targets, an upstream gradient other than 1), the model
switch (model.loss_chunk), bf16 autocast, torch.compile, and the error paths."""

import time

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, ModelConfig
from gpt.config import Config, ConfigError
from gpt.loss import chunked_cross_entropy

F64 = dict(dtype=torch.float64)


def plain_loss(x, weight, targets, vocab_size):
    """The model's plain path, written out: every logit at once, padding columns -inf."""
    logits = x @ weight.T  # (N, V')
    logits[:, vocab_size:] = float("-inf")
    return F.cross_entropy(logits, targets, ignore_index=-1)


def inputs(N, C, V, rows, seed=0, ignored=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen, **F64).requires_grad_()
    weight = torch.randn(rows, C, generator=gen, **F64) * 0.5
    weight[V:] = torch.randn(rows - V, C, generator=gen, **F64)  # padding rows are not zero here
    weight.requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[list(ignored)] = -1
    return x, weight, targets


def grads(loss_fn, x, weight, upstream):
    x.grad = weight.grad = None
    loss = loss_fn()
    (loss * upstream).backward()
    return loss.detach(), x.grad.clone(), weight.grad.clone()


# (tokens N, width C, vocabulary V, padded rows V', chunk, ignored rows)
SHAPES = [
    (1, 8, 11, 11, 1, ()),  # T = 1
    (1, 8, 11, 16, 4, ()),  # one token, chunk larger than N, padded vocabulary
    (37, 16, 67, 128, 8, (0, 5, 36)),  # odd N, chunk does not divide it, last row ignored
    (37, 16, 67, 67, 37, (3,)),  # one chunk exactly, no padding
    (64, 12, 50, 56, 16, ()),  # chunks divide N; vocab 50, padded to 56
    (23, 8, 97, 100, 5, tuple(range(0, 23, 2))),  # half the rows ignored
    (50, 24, 67, 128, 1, (49,)),  # one token per chunk
    (50, 24, 67, 128, 49, ()),  # the last chunk one token long
]


@pytest.mark.parametrize("N, C, V, rows, chunk, ignored", SHAPES)
def test_loss_and_gradients_match_the_plain_path_in_float64(N, C, V, rows, chunk, ignored):
    x, weight, targets = inputs(N, C, V, rows, seed=N + chunk, ignored=ignored)
    upstream = 2.5  # e.g. 1 / grad_accum: the gradient must be scaled by it
    ref = grads(lambda: plain_loss(x, weight, targets, V), x, weight, upstream)
    out = grads(lambda: chunked_cross_entropy(x, weight, targets, V, chunk), x, weight, upstream)
    for name, a, b in zip(("loss", "grad x", "grad weight"), out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)
    assert not out[2][V:].any(), "the padding rows must get exactly zero gradient"


def test_frozen_head_gets_no_gradient_and_x_still_does():
    x, weight, targets = inputs(9, 8, 11, 16, ignored=(2,))
    weight.requires_grad_(False)
    chunked_cross_entropy(x, weight, targets, 11, 4).backward()
    ref_x = x.grad.clone()
    x.grad = None
    plain_loss(x, weight, targets, 11).backward()
    torch.testing.assert_close(ref_x, x.grad, rtol=1e-12, atol=1e-13)
    assert weight.grad is None


def small_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=67, block_size=32, n_layer=2, n_head=2, n_embd=16, vocab_multiple=64)
    return GPT(ModelConfig(**{**cfg, **kw})).to(dtype)


@pytest.mark.parametrize("T", [1, 13, 32])
@pytest.mark.parametrize("tied", [True, False])
def test_model_switch_gives_the_plain_loss_and_gradients(T, tied):
    """model.loss_chunk = 5 against 0, float64, padded vocabulary (67 -> 128 rows): the same
    loss and every parameter's gradient; the logits are not returned."""
    plain = small_model(tie_embeddings=tied)
    chunked = small_model(tie_embeddings=tied, loss_chunk=5)
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 67, (3, T))
    targets = torch.randint(0, 67, (3, T))
    targets[0, -1] = -1
    (_, l1), (logits, l2) = plain(idx, targets), chunked(idx, targets)
    assert logits is None
    torch.testing.assert_close(l2, l1, rtol=1e-12, atol=1e-13)
    l1.backward()
    l2.backward()
    theirs = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert not chunked.lm_head.weight.grad[67:].any()
    with torch.no_grad():  # without targets the logits are the plain path's
        torch.testing.assert_close(chunked(idx), plain(idx))


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_agrees_with_the_plain_path():
    x, weight, targets = inputs(40, 32, 67, 128, ignored=(1,))
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out = {}
    for name, fn in (
        ("plain", lambda: plain_loss(x32, w32, targets, 67)),
        ("chunked", lambda: chunked_cross_entropy(x32, w32, targets, 67, 16)),
    ):
        x32.grad = w32.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            loss = fn()
        loss.backward()
        out[name] = (loss.detach(), x32.grad.clone(), w32.grad.clone())
    assert out["chunked"][0].dtype == torch.float32  # the softmax in fp32
    for a, b in zip(out["chunked"], out["plain"], strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 2e-2  # bf16 operands
    ref = grads(lambda: plain_loss(x, weight, targets, 67), x, weight, 1.0)[0]
    assert abs(out["chunked"][0].double() - ref) / ref < 1e-2  # and near the float64 loss


def test_compiled_matches_eager():
    x, weight, targets = inputs(37, 16, 67, 128, ignored=(4,))
    start = time.perf_counter()
    compiled = torch.compile(chunked_cross_entropy, fullgraph=True)
    out = grads(lambda: compiled(x, weight, targets, 67, 8), x, weight, 1.5)
    ref = grads(lambda: plain_loss(x, weight, targets, 67), x, weight, 1.5)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert time.perf_counter() - start < 120, "compiling the chunked loss became slow"


def test_chunk_below_one_is_refused():
    x, weight, targets = inputs(4, 8, 11, 11)
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
        chunked_cross_entropy(x, weight, targets, 11, 0)


def test_config_refuses_a_negative_chunk_and_zero_stage_3():
    with pytest.raises(ConfigError, match="model.loss_chunk must be an integer >= 0, got -1"):
        ModelConfig(loss_chunk=-1).validate()
    cfg = Config()
    cfg.model.loss_chunk = 4096
    cfg.deepspeed = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match="model.loss_chunk = 4096 .* ZeRO stage 3"):
        cfg.validate(world_size=1)
