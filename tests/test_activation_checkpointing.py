"""train.activation_checkpointing (gpt/model.py): the same losses and gradients as without it,
bit for bit (the recompute runs the same float32 CPU kernels on the same inputs, with the
dropout RNG restored, and autograd accumulates each gradient in the same order), in the model,
under LoRA and frozen blocks, and through the trainer; within float rounding under
torch.compile (the recompute is fused into the backward graph); only block inputs kept; never
in evaluation or decoding; and the memory estimate's term for it."""

import dataclasses
import json

import pytest
import torch
from runs import config, records

import gpt.model
from gpt import GPT, ModelConfig
from gpt.cli import train
from gpt.config import Config
from gpt.lora import add_lora, freeze
from gpt.memory import activation_bytes
from gpt.model import KVCache
from gpt.store import latest_checkpoint

SMALL = ModelConfig(vocab_size=70, block_size=16, n_layer=3, n_head=4, n_embd=32)
SWITCHES = [
    {},
    dict(dropout=0.2),
    dict(
        dropout=0.1, mlp="swiglu", norm="rmsnorm", position_encoding="rope", n_kv_head=2, bias=False
    ),
    dict(dropout=0.1, attention="naive", norm_position="post"),
    dict(dropout=0.1, loss_chunk=7, vocab_multiple=64),
]


def loss_and_grads(model: GPT, recompute: bool, seed: int = 0) -> tuple[torch.Tensor, dict]:
    model.activation_checkpointing = recompute
    model.zero_grad(set_to_none=True)
    x = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.block_size))
    torch.manual_seed(seed)  # the dropout masks' RNG, the same for both runs
    _, loss = model(x, x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture
def calls(monkeypatch) -> list:
    """Every call of torch.utils.checkpoint.checkpoint that gpt/model.py makes."""
    made = []

    def counting(*args, **kwargs):
        made.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(gpt.model, "checkpoint", counting)
    return made


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_losses_and_gradients_equal_those_without_checkpointing(switches, calls):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(SMALL, **switches)).train()
    torch.manual_seed(1)  # the batch
    plain_loss, plain = loss_and_grads(model, False)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, True)
    assert len(calls) == SMALL.n_layer  # one checkpoint per block
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert torch.equal(grad, plain[name]), name
    if switches.get("dropout"):  # the masks mattered: another seed gives another loss
        torch.manual_seed(1)
        assert not torch.equal(loss_and_grads(model, True, seed=1)[0], loss)


@pytest.mark.parametrize("lora", [0, 4])
def test_frozen_blocks_and_lora_adapters_get_the_same_gradients(lora):
    """The first block frozen (its input needs no gradient, nothing to recompute for), or
    every base weight frozen under LoRA with dropout on the adapters' input."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(SMALL, dropout=0.1)).train()
    if lora:
        add_lora(model, lora, 16.0, 0.1, ["attn.c_attn", "mlp.c_fc"])
    freeze(model, embeddings=True, blocks=1)
    torch.manual_seed(1)
    plain_loss, plain = loss_and_grads(model, False)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, True)
    assert torch.equal(loss, plain_loss) and grads.keys() == plain.keys()
    assert all(p.grad is None for p in model.transformer.h[0].parameters())
    for name, grad in grads.items():
        assert torch.equal(grad, plain[name]), name


def saved_bytes(m: ModelConfig, recompute: bool) -> int:
    """Bytes of the tensors autograd keeps for one forward pass (each storage once, the
    parameters left out)."""
    model = GPT(m)
    model.activation_checkpointing = recompute
    x = torch.randint(0, m.vocab_size, (4, m.block_size))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(seen.values())


def test_a_checkpointed_block_keeps_nothing_but_its_input():
    """Two more checkpointed blocks save their inputs alone (B T C fp32 each; what runs inside
    them is dropped at once), and the estimate grows by just those inputs."""
    one, three = dataclasses.replace(SMALL, n_layer=1), SMALL
    inputs = 2 * 4 * SMALL.block_size * SMALL.n_embd * 4
    assert saved_bytes(three, True) - saved_bytes(one, True) == inputs
    assert saved_bytes(three, False) - saved_bytes(one, False) > 10 * inputs
    cfg = {n: Config(model=m) for n, m in ((1, one), (3, three))}
    for c in cfg.values():
        c.train.activation_checkpointing = True
    grown = activation_bytes(cfg[3], 4) - activation_bytes(cfg[1], 4)
    assert grown == inputs
    plain = Config(model=SMALL)
    assert activation_bytes(plain, 4) > activation_bytes(cfg[3], 4)


def test_evaluation_and_decoding_never_checkpoint(calls):
    """In eval mode (even with gradients on), without gradients, and with a KV cache (the
    recompute would append to the cache twice) the blocks run plainly."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    model.activation_checkpointing = True
    x = torch.randint(0, SMALL.vocab_size, (2, 10))
    model.eval()
    model(x, x)[1].backward()
    model.train()
    with torch.no_grad():
        model(x, x)
    cache = KVCache(SMALL, 2)
    cached = torch.cat([model(x[:, :6], kv_cache=cache), model(x[:, 6:], kv_cache=cache)], 1)
    assert calls == []
    with torch.no_grad():
        assert torch.allclose(cached, model(x), atol=1e-5)  # dropout 0: train mode is eval's
    model(x, x)
    assert len(calls) == SMALL.n_layer


@pytest.mark.slow
def test_under_torch_compile_gradients_agree_to_rounding():
    """Compiled with and without checkpointing (dropout on: inductor's RNG, restored for the
    recompute too): the same loss, gradients within float32 rounding."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(SMALL, n_layer=2, dropout=0.2)).train()
        model.compile()
        torch.manual_seed(1)
        results.append(loss_and_grads(model, recompute))
    (plain_loss, plain), (loss, grads) = results
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_trainer_logs_the_same_numbers_and_exports_no_trace_of_it(tmp_path, data_dir, calls):
    """Two short runs with dropout, with and without train.activation_checkpointing: the same
    losses, gradient norms and validation losses to the last bit, the same final weights;
    the exported model's config.json does not know how it was trained."""
    outs = []
    for recompute in (False, True):
        path, out = config(tmp_path, data_dir, f"run-{recompute}", dropout=0.1)
        args = [str(path), "--train.max_steps=4", "--train.eval_interval=2"]
        assert (
            train.main([*args, f"--train.activation_checkpointing={str(recompute).lower()}"]) == 0
        )
        assert bool(calls) == recompute  # the trainer turned it on, and only when asked
        outs.append(out)
    plain, checkpointed = (records(out) for out in outs)
    assert len(plain) == 4 and any("val_loss" in r for r in plain)
    for got, want in zip(checkpointed, plain, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            assert got.get(key) == want.get(key), (got["step"], key)
    models = [latest_checkpoint(out) / "model" for out in outs]
    a, b = (GPT.from_pretrained(m).state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((models[1] / "config.json").read_text())
    assert "activation_checkpointing" not in json.dumps(exported)
