"""Hugging Face GPT-2 interop, offline: random transformers models saved locally."""

import json

import pytest
import torch
import transformers

from gpt import GPT, ModelConfig
from gpt.config import ConfigError

transformers.logging.set_verbosity_error()


def hf_model(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=131,
        n_positions=37,
        n_embd=48,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})).eval()
    # random non-trivial LayerNorm / bias values so that a missed mapping cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize(
    "kw", [{}, {"activation_function": "relu"}, {"n_positions": 64, "vocab_size": 50}]
)
def test_hugging_face_checkpoint_gives_the_same_logits(tmp_path, kw):
    hf, path = hf_model(tmp_path, **kw)
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, hf.config.n_positions))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5
    assert (
        ours.cfg.block_size == hf.config.n_positions and ours.cfg.vocab_size == hf.config.vocab_size
    )
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(1)
    ours = GPT(ModelConfig(vocab_size=97, block_size=29, n_layer=2, n_head=3, n_embd=36)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 97, (3, 29))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "switches",
    [
        dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False),
        dict(norm_position="post", position_encoding="sinusoidal", mlp="relu", n_kv_head=2),
    ],
)
def test_extra_switches_survive_a_round_trip(tmp_path, switches):
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **switches)
    model = GPT(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    assert (
        json.loads((tmp_path / "m" / "config.json").read_text())["gpt_config"]["n_kv_head"]
        == cfg.n_kv_head
    )
    loaded = GPT.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg == cfg
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_overrides_and_headless_gpt2model(tmp_path):
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2Model(config).eval()  # keys without the "transformer." prefix
    base.save_pretrained(tmp_path / "base")
    ours = GPT.from_pretrained(tmp_path / "base", attention="naive", dropout=0.1).eval()
    assert ours.cfg.attention == "naive" and ours.cfg.dropout == 0.1
    idx = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        hidden = base(idx).last_hidden_state
        torch.testing.assert_close(ours(idx), hidden @ base.wte.weight.T, rtol=1e-5, atol=1e-5)


def test_pickles_are_refused_not_unpickled(tmp_path):
    pickle_file = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    with pytest.raises(
        ValueError, match=r"pytorch_model.bin: refusing to load a pickle file.*arbitrary code"
    ):
        GPT.from_pretrained(pickle_file)
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 5, "n_layer": 1, "n_head": 1, "n_embd": 4})
    )
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refusing.*safetensors"):
        GPT.from_pretrained(tmp_path)


def test_missing_and_malformed_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json here"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors here"):
        GPT.from_pretrained(tmp_path)


def test_unsupported_hugging_face_settings_are_named(tmp_path):
    _, path = hf_model(tmp_path, activation_function="gelu")
    with pytest.raises(
        ConfigError, match=r"activation_function 'gelu' is not supported; valid: \['gelu_new'"
    ):
        GPT.from_pretrained(path)
    _, path = hf_model(tmp_path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(
        ConfigError, match="scale_attn_by_inverse_layer_idx = true is not supported"
    ):
        GPT.from_pretrained(path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    _, path = hf_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: transformer\.\S+ has shape \(\d+.*\), the config needs",
    ):
        GPT.from_pretrained(path)
    config["n_embd"], config["n_layer"] = 48, 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['transformer.h.2"):
        GPT.from_pretrained(path)
