"""The GPT model: every switch against an independent float64 reference, causality for every
backend, naive vs sdpa gradients, GPT-2 initialisation, loss masking and error paths."""

import dataclasses
import math

import pytest
import torch

from gpt import GPT, ModelConfig
from gpt.attention import attention_status

BACKENDS = [name for name, why in attention_status().items() if why is None]
SMALL = dict(vocab_size=67, block_size=64, n_layer=2, n_head=4, n_embd=48)
SWITCHES = {
    "gpt2": {},
    "post": dict(norm_position="post"),
    "sinusoidal": dict(position_encoding="sinusoidal"),
    "rope": dict(position_encoding="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "relu": dict(mlp="relu"),
    "swiglu": dict(mlp="swiglu"),
    "gqa2": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "nobias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "padded": dict(vocab_multiple=64),  # 67 -> 128 rows
    "mixed": dict(
        norm_position="post", position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2
    ),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **kw})).eval()
    # perturb norms and biases away from their 1/0 init so that the reference checks them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        # GPT-2's init gives attention scores ~1e-2: a near-uniform softmax that would hide
        # a wrong (or missing) 1/sqrt(D) scale. Scaling W_q and W_k by 10 makes them O(1).
        C, kv = model.cfg.n_embd, model.cfg.kv_heads * (model.cfg.n_embd // model.cfg.n_head)
        for block in model.transformer.h:
            block.attn.c_attn.weight[: C + kv] *= 10
    return model


def reference_logits(
    model: GPT, idx: torch.Tensor, dtype=torch.float64, scale: float | None = None
) -> torch.Tensor:
    """The same network written out in float64 (or ``dtype``) from the state dict, from the
    formulas of the papers, sharing no code with gpt/model.py. ``scale`` replaces the
    attention's 1/sqrt(D) (to show that a test would notice it missing)."""
    cfg = model.cfg
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.kv_heads
    D, T = C // H, idx.shape[1]

    def get(name):
        return sd.get(name)

    def linear(x, prefix):
        y = x @ get(prefix + ".weight").T
        return y + get(prefix + ".bias") if get(prefix + ".bias") is not None else y

    def norm(x, prefix):
        w, b = get(prefix + ".weight"), get(prefix + ".bias")
        if cfg.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        y = (x - mu) / torch.sqrt(var + cfg.norm_eps) * w
        return y + b if b is not None else y

    def rotate(x):  # x (B, heads, T, D): pairs (i, i + D/2) as complex numbers
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
        freqs = cfg.rope_theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
        angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
        z = z * torch.polar(torch.ones(T, D // 2, dtype=torch.float64), angles).to(z.dtype)
        return torch.cat([z.real, z.imag], -1)

    def attention(x, prefix):
        qkv = linear(x, prefix + ".c_attn")
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
        q = q.unflatten(-1, (H, D)).transpose(1, 2)
        k = k.unflatten(-1, (Hkv, D)).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = v.unflatten(-1, (Hkv, D)).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        if cfg.position_encoding == "rope":
            q, k = rotate(q), rotate(k)
        s = q @ k.transpose(-1, -2) * (1 / math.sqrt(D) if scale is None else scale)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return linear(y, prefix + ".c_proj")

    def mlp(x, prefix):
        h = linear(x, prefix + ".c_fc")
        if cfg.mlp == "gelu":
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        elif cfg.mlp == "relu":
            h = h.clamp_min(0)
        else:
            g, u = h.chunk(2, -1)
            h = g * torch.sigmoid(g) * u
        return linear(h, prefix + ".c_proj")

    x = sd["transformer.wte.weight"][idx]
    if cfg.position_encoding == "learned":
        x = x + sd["transformer.wpe.weight"][:T]
    elif cfg.position_encoding == "sinusoidal":
        pe = torch.zeros(T, C, dtype=dtype)
        for p in range(T):
            for i in range(C):
                angle = p / 10000 ** ((i - i % 2) / C)
                pe[p, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
        x = x + pe
    for n in range(cfg.n_layer):
        pre = f"transformer.h.{n}"
        if cfg.norm_position == "pre":
            x = x + attention(norm(x, pre + ".ln_1"), pre + ".attn")
            x = x + mlp(norm(x, pre + ".ln_2"), pre + ".mlp")
        else:
            x = norm(x + attention(x, pre + ".attn"), pre + ".ln_1")
            x = norm(x + mlp(x, pre + ".mlp"), pre + ".ln_2")
    if cfg.norm_position == "pre":
        x = norm(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"][: cfg.vocab_size].T


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_matches_float64_reference(switch, backend):
    """Logits within 4x the rounding error of the reference formulas evaluated in float32
    (measured per case: ~1e-7; the model's own error is 0.7x-1.7x of it). The attention
    scores are O(1) (see ``make``), so a missing 1/sqrt(D) scale is off by far more."""
    model = make(attention=backend, **SWITCHES[switch])
    idx = torch.randint(0, 67, (2, 19))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, 19, 67)
    reference = reference_logits(model, idx)
    rounding = (reference_logits(model, idx, torch.float32).double() - reference).abs().max()
    assert (logits.double() - reference).abs().max() <= 4 * rounding
    unscaled = reference_logits(model, idx, scale=1.0)
    assert (unscaled - reference).abs().max() > 1000 * rounding  # the test can tell


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causality(switch, backend):
    """Changing tokens after position t never changes the logits at positions <= t."""
    model = make(attention=backend, **SWITCHES[switch])
    T, t = 16, 6
    a = torch.randint(0, 67, (2, T))
    b = a.clone()
    b[:, t + 1 :] = torch.randint(0, 67, (2, T - t - 1))
    assert not torch.equal(a, b)
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, : t + 1], lb[:, : t + 1], rtol=0, atol=1e-6)
    assert (la[:, t + 1 :] - lb[:, t + 1 :]).abs().max() > 1e-3  # the future does matter


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("switch", ["gpt2", "mixed"])
def test_naive_and_sdpa_agree_on_outputs_and_gradients(T, switch):
    """Head dimension 12: not a power of two."""
    naive = make(attention="naive", **SWITCHES[switch])
    sdpa = make(attention="sdpa", **SWITCHES[switch])
    idx, targets = torch.randint(0, 67, (3, T)), torch.randint(0, 67, (3, T))
    results = []
    for model in (naive, sdpa):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert relative_error(l2, l1) <= 1e-5
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        assert relative_error(g2[name], g1[name]) <= 1e-5, name


def test_set_attention_switches_backend_keeps_weights():
    model = make(attention="naive")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 67, (2, 9))
    with torch.no_grad():
        expected = model(idx)
        model.set_attention("sdpa")
        got = model(idx)
    assert model.cfg.attention == "sdpa"
    assert all(b.attn.attend.__name__ == "sdpa_attention" for b in model.transformer.h)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*naive"):
        model.set_attention("nope")
    assert model.cfg.attention == "sdpa"


def test_loss_is_mean_cross_entropy_over_targets_not_minus_one():
    model = make()
    idx = torch.randint(0, 67, (2, 8))
    targets = torch.randint(0, 67, (2, 8))
    targets[0, :3] = -1
    targets[1, 5] = -1
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.double(), -1)
    picked = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(8) if targets[b, t] >= 0]
    assert len(picked) == 12
    torch.testing.assert_close(loss.double(), torch.stack(picked).mean(), rtol=1e-6, atol=1e-6)


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, block_size=256, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected = 0.02 / math.sqrt(2 * cfg.n_layer)
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            expected = 0.02
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
            continue
        else:  # LayerNorm weights
            assert torch.all(p == 1), name
            continue
        assert abs(p.std().item() - expected) < 0.05 * expected, name
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_num_params_counts_tied_head_once():
    model = make()
    C, V, P, L = 48, 67, 64, 2
    per_block = (4 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + P * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=True) == model.num_params() - P * C
    assert make(position_encoding="rope").num_params() == model.num_params() - P * C


def test_dropout_is_active_only_in_training():
    model = make(dropout=0.5)
    idx = torch.randint(0, 67, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_sequence_longer_than_block_size_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="sequence length 65 exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(norm_position="middle"), r"model.norm_position = 'middle' is not valid.*pre, post"),
        (
            dict(position_encoding="alibi"),
            r"position_encoding = 'alibi'.*learned, sinusoidal, rope",
        ),
        (dict(norm="batchnorm"), r"model.norm = 'batchnorm'.*layernorm, rmsnorm"),
        (dict(mlp="geglu"), r"model.mlp = 'geglu'.*gelu, relu, swiglu"),
        (dict(n_embd=50), r"n_embd \(50\) must be divisible by model.n_head \(4\)"),
        (dict(n_kv_head=3), r"n_kv_head \(3\) must be a positive divisor of model.n_head \(4\)"),
        (dict(n_kv_head=0), r"n_kv_head \(0\) must be a positive divisor"),
        (dict(n_embd=44, position_encoding="rope"), r"rope' needs an even head dimension.*11"),
        (dict(n_embd=36, position_encoding="rope"), r"even head dimension; n_embd / n_head = 9"),
        (dict(dropout=1.0), r"model.dropout must be in \[0, 1\), got 1.0"),
        (dict(n_layer=0), r"model.n_layer must be a positive integer, got 0"),
        (dict(vocab_multiple=0), r"model.vocab_multiple must be a positive integer.*got 0"),
        (dict(attention="flash9"), r"unknown attention backend 'flash9'; valid names"),
    ],
)
def test_bad_model_config_is_an_error(bad, match):
    with pytest.raises(ValueError, match=match):
        GPT(dataclasses.replace(ModelConfig(**SMALL), **bad))


def test_swiglu_hidden_width_matches_a_4x_mlp_in_parameters():
    cfg = ModelConfig(**{**SMALL, "n_embd": 768, "n_head": 12, "mlp": "swiglu"})
    assert cfg.mlp_hidden == 2048 and 3 * cfg.mlp_hidden * 768 == 8 * 768 * 768
    assert ModelConfig(**{**SMALL, "mlp": "swiglu"}).mlp_hidden == 128  # 8/3*48 = 128
    assert ModelConfig(**{**SMALL, "n_embd": 40, "n_head": 4, "mlp": "swiglu"}).mlp_hidden == 112


@pytest.mark.parametrize(
    "vocab_size, multiple, tied", [(67, 64, True), (67, 64, False), (50, 7, True), (128, 64, True)]
)
def test_padded_vocabulary_changes_nothing_but_the_matmul_shape(vocab_size, multiple, tied):
    """A padded model with the same real weights gives the same logits, loss and gradients,
    bit for bit; its padding rows get no gradient, so they stay zero."""
    cfg = dict(SMALL, vocab_size=vocab_size, tie_embeddings=tied)
    plain = GPT(ModelConfig(**cfg))
    padded = GPT(ModelConfig(**cfg, vocab_multiple=multiple))
    rows = -(-vocab_size // multiple) * multiple
    assert padded.transformer.wte.weight.shape[0] == padded.lm_head.weight.shape[0] == rows
    assert not padded.transformer.wte.weight[vocab_size:].any()
    padded.load_weights(plain.state_dict(), "plain")  # real rows in, zero rows appended
    idx, targets = torch.randint(0, vocab_size, (2, 11)), torch.randint(0, vocab_size, (2, 11))
    targets[0, 3] = -1
    (l1, loss1), (l2, loss2) = plain(idx, targets), padded(idx, targets)
    assert l2.shape == (2, 11, vocab_size) and torch.equal(l1, l2) and torch.equal(loss1, loss2)
    loss1.backward()
    loss2.backward()
    grads = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        assert torch.equal(p.grad[: grads[name].shape[0]], grads[name].grad), name
        assert not p.grad[grads[name].shape[0] :].any(), name
    with torch.no_grad():
        logits = padded(idx)
    assert logits.shape == (2, 11, vocab_size) and torch.equal(logits, l1.detach())
    assert logits.stride(1) == rows  # a view of the padded logits, not a copy


def test_untied_head_is_its_own_parameter():
    torch.manual_seed(0)
    tied, untied = make(), make(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + 67 * 48
    assert abs(untied.lm_head.weight.std().item() - 0.02) < 0.002  # GPT-2's init, as wte
    idx = torch.randint(0, 67, (2, 9))
    _, loss = untied(idx, idx)
    loss.backward()
    assert untied.lm_head.weight.grad.abs().sum() > 0
    assert not torch.equal(untied.lm_head.weight.grad, untied.transformer.wte.weight.grad)
