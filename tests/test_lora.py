"""gpt/lora.py: a LoRA layer against the formula computed by hand in float64,
y = W x + b + (alpha / r) B A x; a zero B gives the base output exactly; merging equals the
adapted model; only the adapters train; the rank bound is min(in, out) of the smallest
targeted layer; freezing and the trainable count. (LoRA inside training runs, and the
config's refusal of a rank past the bound, are in test_finetune.py.)"""

import pytest
import torch
from torch import nn

from gpt.config import ModelConfig
from gpt.lora import (
    LoRALinear,
    add_lora,
    count_trainable,
    freeze,
    lora_state,
    max_rank,
    merge_lora,
)
from gpt.model import GPT

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every one LoRA wraps

LAYERS = [(8, 5, 1, True), (8, 5, 5, False), (3, 12, 2, True), (16, 16, 16, True)]


def layer(n_in: int, n_out: int, rank: int, bias: bool, alpha: float = 6.0, dropout=0.0):
    """A float64 LoRALinear with random (non-zero) A and B."""
    torch.manual_seed(n_in * 100 + n_out * 10 + rank)
    base = nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    lora = LoRALinear(base, rank, alpha, dropout)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    return lora


@pytest.mark.parametrize("n_in, n_out, rank, bias", LAYERS, ids=str)
@pytest.mark.parametrize("alpha", [1.0, 6.0])
def test_forward_is_w_x_plus_alpha_over_r_b_a_x(n_in, n_out, rank, bias, alpha):
    lora = layer(n_in, n_out, rank, bias, alpha).eval()
    assert lora.lora_A.shape == (rank, n_in) and lora.lora_B.shape == (n_out, rank)
    x = torch.randn(2, 3, n_in, dtype=torch.float64)
    W, A, B = lora.weight, lora.lora_A, lora.lora_B
    want = torch.einsum("oi,bti->bto", W + (alpha / rank) * (B @ A), x)
    if bias:
        want = want + lora.bias
    with torch.no_grad():
        torch.testing.assert_close(lora(x), want, rtol=1e-12, atol=1e-12)
        merged = lora.merged()
        assert type(merged) is nn.Linear and (merged.bias is None) == (not bias)
        assert merged.weight.dtype == torch.float64
        torch.testing.assert_close(merged(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out, rank, bias", LAYERS, ids=str)
def test_a_fresh_adapter_leaves_the_base_output_exactly(n_in, n_out, rank, bias):
    """B starts at zero (A does not: both zero would get no gradient), so the adapted layer
    starts equal to the base, dropout on or off."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias)
    lora = LoRALinear(base, rank, 4.0, dropout=0.5)
    assert lora.weight is base.weight and lora.bias is base.bias  # shared, not copied
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    x = torch.randn(4, n_in)
    for mode in (True, False):
        lora.train(mode)
        with torch.no_grad():
            assert torch.equal(lora(x), base(x))


def test_dropout_acts_on_the_adapter_input_in_training_only():
    lora = layer(8, 5, 2, True, dropout=0.5)
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        evaluated = lora.eval()(x)
        assert torch.equal(lora(x), evaluated)
        torch.manual_seed(0)
        trained = lora.train()(x)
    assert not torch.allclose(trained, evaluated)
    # the base path never drops: with B = 0 the training output is the base output
    with torch.no_grad():
        lora.lora_B.zero_()
        assert torch.equal(lora.train()(x), nn.functional.linear(x, lora.weight, lora.bias))


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=50, block_size=9, n_layer=2, n_head=3, n_embd=24)
    return GPT(ModelConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_lora_equals_the_adapted_model(dtype):
    torch.manual_seed(0)
    model = tiny().to(dtype).eval()
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        base = model(idx)
    add_lora(model, 3, 6.0, 0.0, list(TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }
    with torch.no_grad():
        adapted = model(idx)
        merged = merge_lora(model)(idx)
    assert not torch.allclose(adapted, base)  # the adapters change the output
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(merged, adapted, rtol=0, atol=tol)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_add_lora_wraps_the_targets_only_and_freezes_the_rest():
    model = tiny()
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    add_lora(model, 2, 4.0, 0.0, ["attn.c_attn", "mlp.c_proj"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [
        f"transformer.h.{i}.{t}" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_proj")
    ]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{w}.lora_{k}" for w in wrapped for k in "AB")
    assert sorted(lora_state(model)) == trainable
    assert count_trainable(model) == 2 * sum(2 * (i + o) for i, o in [(24, 72), (96, 24)])
    # the base weights keep their names: a base state dict loads into the adapted model
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert sorted(missing) == trainable and unexpected == []


def test_an_unknown_target_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError) as err:
        add_lora(tiny(), 2, 4.0, 0.0, ["attn.c_attn", "attn.qkv"])
    assert str(err.value) == (
        "finetune.lora_targets: unknown ['attn.qkv']; valid: " + ", ".join(TARGETS)
    )


SHAPES = [
    dict(n_head=2, n_embd=32),  # c_attn 32 -> 96, c_fc 32 -> 128
    dict(n_head=4, n_embd=32, n_kv_head=1),  # c_attn 32 -> 48
    dict(n_head=2, n_embd=48, mlp_hidden_dim=20),  # c_fc 48 -> 20, c_proj 20 -> 48
    dict(n_head=2, n_embd=16, mlp="swiglu"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("targets", [[t] for t in TARGETS] + [list(TARGETS)], ids=str)
def test_max_rank_is_the_smallest_side_of_the_targeted_layers(shape, targets):
    cfg = ModelConfig(vocab_size=50, block_size=8, n_layer=1, **shape)
    layers = {
        n.removeprefix("transformer.h.0."): m
        for n, m in add_lora(GPT(cfg), 1, 1.0, 0.0, targets).named_modules()
        if isinstance(m, LoRALinear)
    }
    bound, why = max_rank(cfg, targets)
    assert bound == min(min(m.in_features, m.out_features) for m in layers.values())
    name = why.split(" is ")[0]
    assert why == f"{name} is {layers[name].in_features} -> {layers[name].out_features}"
    assert min(layers[name].in_features, layers[name].out_features) == bound


def test_max_rank_names_the_limiting_layer():
    cfg = ModelConfig(
        vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=48, mlp_hidden_dim=20
    )
    assert max_rank(cfg, ["attn.c_attn", "mlp.c_proj"]) == (20, "mlp.c_proj is 20 -> 48")
    assert max_rank(cfg, ["attn.c_attn"]) == (48, "attn.c_attn is 48 -> 144")


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_counts_the_real_vocabulary_only(tied):
    cfg = dict(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=8, tie_embeddings=tied)
    padded = GPT(ModelConfig(**cfg, vocab_multiple=64))
    plain = GPT(ModelConfig(**cfg))
    assert count_trainable(padded) == count_trainable(plain) == plain.num_params()
    freeze(padded, embeddings=True, blocks=1)
    freeze(plain, embeddings=True, blocks=1)
    assert count_trainable(padded) == count_trainable(plain) < plain.num_params()


def test_freeze_embeddings_and_the_first_blocks():
    model = tiny(n_layer=3, tie_embeddings=False)
    freeze(model, embeddings=True, blocks=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(
            ("transformer.wte.", "transformer.wpe.", "transformer.h.0.", "transformer.h.1.")
        )
    }
    assert frozen == expected and "lm_head.weight" not in frozen  # untied: the head trains
    model = tiny(n_layer=3)
    freeze(model, embeddings=False, blocks=0)
    assert count_trainable(model) == model.num_params()
