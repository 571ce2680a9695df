"""Learning-rate schedule, parameter groups, the non-finite guard, FLOPs and MFU."""

import math

import pytest
import torch

from gpt import GPT, ModelConfig
from gpt.config import OptimConfig
from gpt.train.metrics import PEAK_TFLOPS, flops_per_token, peak_flops
from gpt.train.optim import GuardedAdamW, lr_at, param_groups


def test_lr_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 104) == 1.0  # cosine starts at the peak
    assert lr_at(54, cfg, 104) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert lr_at(29, cfg, 104) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(104, cfg, 104) == 0.1 and lr_at(10**6, cfg, 104) == 0.1
    values = [lr_at(s, cfg, 104) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_guard_skips_non_finite_and_leaves_state_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert opt.skipped.item() == 0.0 and not opt.overflow  # DeepSpeed's host flag stays False
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    for bad in (float("nan"), float("inf")):
        p.grad = torch.tensor([1.0, bad, 3.0])
        opt.step()
        assert opt.skipped.item() == 1.0 and not opt.overflow
        assert torch.equal(p, before)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_guard_clips_and_reports_the_pre_clip_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = GuardedAdamW([p], clip=1.0, lr=0.1)
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert opt._global_grad_norm.item() == pytest.approx(5.0)
    assert opt.state[p]["exp_avg"].norm().item() == pytest.approx(0.1 * 1.0, rel=1e-5)


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg)
    n = model.num_params() - 16 * 8  # the position table does no multiply-adds
    assert flops_per_token(model, 16) == 6 * n + 6 * 2 * 16 * 8


def test_peak_table(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16") is None
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA H200": 989e12,
        "NVIDIA GeForce RTX 4090": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0), "bf16") == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(torch.device("cuda", 0), "fp32") == 156e12  # TF32
    assert [f for f, _ in PEAK_TFLOPS].index("H100 PCIe") < [f for f, _ in PEAK_TFLOPS].index(
        "H100"
    )
