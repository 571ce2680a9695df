"""The SDPA kernel choice (gpt/sdpa.py): the priority order built from model.sdpa_kernels,
PyTorch's state inside the context, the report of the kernel that ran (on the CPU: PyTorch's
flash-style CPU kernel or the math path), the model entering the context, and the errors."""

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from gpt import GPT, ModelConfig
from gpt.config import ConfigError
from gpt.sdpa import (
    DEFAULT_ORDER,
    HOPPER_ORDER,
    KERNELS,
    kernel_of,
    run_sdpa_report,
    sdpa_kernel_report,
    sdpa_order,
    sdpa_priority,
)


def test_explicit_order_is_kept_and_duplicates_dropped():
    assert sdpa_order(["math", "flash", "math"]) == ("math", "flash")
    assert sdpa_order(["cudnn", "flash", "efficient", "math"], "cpu") == HOPPER_ORDER


def test_auto_order_puts_cudnn_first_on_hopper_only(monkeypatch):
    assert sdpa_order([], "cpu") == DEFAULT_ORDER == ("flash", "efficient", "math")
    for major, expected in ((9, HOPPER_ORDER), (8, DEFAULT_ORDER), (10, DEFAULT_ORDER)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert sdpa_order([], "cuda") == expected, major
    assert HOPPER_ORDER[0] == "cudnn" and HOPPER_ORDER[1] == "flash"


@pytest.mark.parametrize("names", [["cudnnn"], ["flash", "Math"], ["sdpa-flash"]])
def test_unknown_kernel_names_the_key_and_the_valid_names(names):
    message = r"model\.sdpa_kernels: unknown SDPA kernel.*valid: cudnn, flash, efficient, math"
    with pytest.raises(ValueError, match=message):
        sdpa_order(names)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(sdpa_kernels=names).validate()
    with pytest.raises(ConfigError, match=message):
        GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                        sdpa_kernels=names))  # fmt: skip


def test_priority_sets_torch_order_and_disables_the_rest():
    before = torch._C._get_sdp_priority_order()
    with sdpa_priority(["cudnn", "math"]):
        order = torch._C._get_sdp_priority_order()
        assert order[:2] == [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.MATH)]
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch._C._get_sdp_priority_order() == before
    assert torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.parametrize(
    "order, kernel, op",
    [
        (DEFAULT_ORDER, "flash", "aten::_scaled_dot_product_flash_attention_for_cpu"),
        (("math",), "math", "aten::_scaled_dot_product_attention_math"),
        (("cudnn", "efficient", "math"), "math", "aten::_scaled_dot_product_attention_math"),
        (HOPPER_ORDER, "flash", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    ],
)
def test_report_names_the_cpu_kernel_that_ran(order, kernel, op):
    """On the CPU: flash (PyTorch's CPU kernel) when allowed, else math; cuDNN and the
    efficient kernel do not run on a CPU, so they are passed over."""
    report = sdpa_kernel_report(order, (1, 4, 16, 8), 2, torch.float32, "cpu")
    assert report["kernel"] == kernel and report["forward_op"] == op
    assert report["priority"] == list(order) and report["dtype"] == "float32"
    if kernel == "flash":
        assert report["backward_op"] == op + "_backward"


def test_run_report_follows_the_model_config():
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_embd=32)
    assert run_sdpa_report(cfg, "fp32", "cpu")["kernel"] == "flash"
    cfg.sdpa_kernels = ["math"]
    report = run_sdpa_report(cfg, "bf16", "cpu")
    assert report["kernel"] == "math" and report["dtype"] == "bfloat16"
    cfg.attention = "naive"
    assert run_sdpa_report(cfg, "fp32", "cpu") is None


def test_kernel_names_of_operators():
    assert kernel_of(["aten::_scaled_dot_product_cudnn_attention"]) == "cudnn"
    assert kernel_of(["aten::_scaled_dot_product_flash_attention"]) == "flash"
    assert kernel_of(["aten::_scaled_dot_product_efficient_attention"]) == "efficient"
    assert kernel_of(["aten::scaled_dot_product_attention"]) is None  # the dispatcher only
    assert kernel_of([]) is None
    assert set(KERNELS) == {"cudnn", "flash", "efficient", "math"}


@pytest.mark.parametrize("names, op", [(["math"], "math"), ([], "flash_attention_for_cpu")])
def test_model_runs_attention_under_its_order(names, op):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8,
                      sdpa_kernels=names)  # fmt: skip
    model = GPT(cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randint(0, 11, (1, 8)))
    ops = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    assert len(ops) == 2 and all(op in n for n in ops), ops  # one per layer


def test_priority_compiles_without_a_graph_break():
    def attend(q):
        with sdpa_priority(HOPPER_ORDER):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(torch.compile(attend, fullgraph=True)(q), attend(q))


def test_exported_model_keeps_the_order_and_a_wrong_type_names_the_key(tmp_path):
    import json

    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                      sdpa_kernels=["flash", "math"], loss_chunk=64)  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "m", architecture="gpt")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert loaded.cfg.sdpa_kernels == ["flash", "math"] and loaded.sdpa_order == ("flash", "math")
    assert loaded.cfg.loss_chunk == 64
    file = tmp_path / "m" / "config.json"
    data = json.loads(file.read_text())
    data["gpt_config"]["sdpa_kernels"] = "flash"
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="gpt_config.sdpa_kernels must be a list of strings"):
        GPT.from_pretrained(tmp_path / "m")


def test_a_list_with_no_kernel_that_runs_here_is_refused_before_any_work(
    tmp_path, data_dir, capsys
):
    """["cudnn"] on a CPU: status 2 naming the key, the device and what does run, and the
    run directory is left as it was (no config.toml written with the bad value)."""
    from runs import config

    from gpt.cli import train

    path, out = config(tmp_path, data_dir)
    assert train.main([str(path), '--model.sdpa_kernels=["cudnn"]']) == 2
    err = capsys.readouterr().err
    assert "train.py: error: model.sdpa_kernels = ['cudnn']: no kernel of cudnn runs causal " in err
    assert "on cpu" in err and "here: flash, math" in err and "Use [] (auto)" in err
    assert not (out / "config.toml").exists() and not (out / "checkpoints").exists()


def test_usable_kernels_checks_masked_calls_apart():
    from gpt.sdpa import sdpa_runs, usable_kernels

    assert usable_kernels(16, torch.float32, "cpu") == ["flash", "math"]
    assert sdpa_runs(("math",), 16, torch.float32, "cpu", masked=True)
    assert not sdpa_runs(("cudnn", "efficient"), 16, torch.float32, "cpu")
