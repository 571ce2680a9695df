"""Hugging Face interop (GPT-2 and Llama), offline: random transformers models saved locally,
our exports loaded by transformers, refusals of what transformers cannot represent, and
malformed config.json files."""

import dataclasses
import itertools
import json

import pytest
import torch
import transformers
from safetensors import safe_open

from gpt import GPT, ModelConfig
from gpt.config import ConfigError
from gpt.convert import choose_architecture, read_model_config
from gpt.convert.__main__ import main as convert_main
from gpt.generate import generate

transformers.logging.set_verbosity_error()
LLAMA = dict(norm="rmsnorm", position_encoding="rope", mlp="swiglu", bias=False)


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
        "checksums.json",  # the sidecar: sha256 of the other two
        "config.json",
        "model.safetensors",
    ]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 97, (3, 29))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "switches, architecture",
    [
        (dict(LLAMA, n_kv_head=1), "llama"),
        (dict(norm_position="post", position_encoding="sinusoidal", mlp="relu", n_kv_head=2),
         "gpt"),
        (dict(norm="rmsnorm", tie_embeddings=False, vocab_multiple=16), "gpt"),
    ],
)  # fmt: skip
def test_extra_switches_survive_a_round_trip(tmp_path, switches, architecture):
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **switches)
    model = GPT(cfg).eval()
    assert model.save_pretrained(tmp_path / "m") == architecture
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


# ---- exports other tools can trust: GPT-2 and Llama, both ways ----------------------------

FAMILIES = {  # odd widths and vocabularies, block sizes that are not powers of two
    "gpt2": dict(vocab_size=97, block_size=29, n_layer=2, n_head=3, n_embd=36),
    "gpt2-relu-untied": dict(
        vocab_size=101, block_size=23, n_layer=1, n_head=5, n_embd=45, mlp="relu",
        mlp_hidden_dim=70, tie_embeddings=False,
    ),
    "gpt2-padded": dict(vocab_size=67, block_size=19, n_layer=3, n_head=2, n_embd=22,
                        vocab_multiple=64, norm_eps=1e-6),
    "llama-mqa": dict(vocab_size=97, block_size=23, n_layer=2, n_head=4, n_kv_head=1, n_embd=40),
    "llama-gqa2-untied-padded": dict(
        vocab_size=131, block_size=37, n_layer=2, n_head=4, n_kv_head=2, n_embd=24,
        mlp_hidden_dim=53, tie_embeddings=False, vocab_multiple=64,
    ),
    "llama-mha": dict(vocab_size=50, block_size=19, n_layer=1, n_head=4, n_kv_head=4,
                      n_embd=56, rope_theta=500.0, norm_eps=1e-6),
    "llama-gqa-6-heads-untied": dict(vocab_size=77, block_size=45, n_layer=3, n_head=6,
                                     n_kv_head=2, n_embd=36, tie_embeddings=False),
}  # fmt: skip


def family_config(name: str) -> ModelConfig:
    return ModelConfig(**FAMILIES[name], **(LLAMA if name.startswith("llama") else {}))


def sharpen(model: torch.nn.Module) -> None:
    """Random norms and biases (a missed mapping cannot hide behind 1 and 0) and larger
    matrices (sharper logits: greedy decoding does not hinge on float rounding)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)


def transformers_model(cfg: ModelConfig) -> transformers.PreTrainedModel:
    """The same shape built by transformers from its own config classes, randomly
    initialised by transformers."""
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if cfg.norm == "rmsnorm":
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
            intermediate_size=cfg.mlp_hidden, max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, **ids,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
        activation_function="relu" if cfg.mlp == "relu" else "gelu_new",
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, **ids,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def assert_same_model(ours: GPT, theirs: transformers.PreTrainedModel, seed: int) -> None:
    """Logits within 1e-5 on full-length batches, and the same greedy continuation."""
    cfg = ours.cfg
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)
    with torch.no_grad():
        expected = theirs(idx).logits
        assert expected.shape == (2, cfg.block_size, cfg.vocab_size)
        assert (ours(idx) - expected).abs().max().item() <= 1e-5
    prompt, new = idx[:, :5], min(12, cfg.block_size - 5)
    want = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert want.shape == (2, 5 + new)
    assert torch.equal(generate(ours, prompt, new, temperature=0), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_export_loads_in_transformers_with_the_same_outputs(tmp_path, family):
    torch.manual_seed(4)
    cfg = family_config(family)
    ours = GPT(cfg).eval()
    sharpen(ours)
    expected_layout = "llama" if cfg.norm == "rmsnorm" else "gpt2"
    assert ours.save_pretrained(tmp_path / "m", architecture="transformers") == expected_layout
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == (
        "LlamaForCausalLM" if cfg.norm == "rmsnorm" else "GPT2LMHeadModel"
    )
    assert theirs.config.vocab_size == cfg.vocab_size  # the real vocabulary, never the padded
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        rows = {f.get_slice(k).get_shape()[0] for k in f.keys() if "embed" in k or "wte" in k}
        assert rows == {cfg.vocab_size}
        assert any("lm_head" in k for k in f.keys()) == (not cfg.tie_embeddings)
    assert_same_model(ours, theirs, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_model_loads_in_ours_with_the_same_outputs(tmp_path, family):
    torch.manual_seed(5)
    cfg = family_config(family)
    theirs = transformers_model(cfg)
    sharpen(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf", vocab_multiple=cfg.vocab_multiple).eval()
    # every field transformers holds comes back (attention backend and dropout are ours)
    assert ours.cfg == dataclasses.replace(
        cfg, dropout=ours.cfg.dropout, mlp_hidden_dim=cfg.mlp_hidden
    )
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == cfg.tie_embeddings
    assert_same_model(ours, theirs, seed=2)


SWITCH_VALUES = {
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "position_encoding": ("learned", "sinusoidal", "rope"),
    "mlp": ("gelu", "relu", "swiglu"),
    "bias": (True, False),
    "n_kv_head": (None, 2),
    "tie_embeddings": (True, False),
}


def every_combination():
    for values in itertools.product(*SWITCH_VALUES.values()):
        yield ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16,
                          **dict(zip(SWITCH_VALUES, values, strict=True)))  # fmt: skip


def test_every_combination_transformers_cannot_represent_is_refused():
    """The rule, written out: GPT-2 is layernorm, pre-norm, learned positions, gelu or relu,
    biases, one key/value head per query head; Llama is rmsnorm, pre-norm, rope, swiglu, no
    biases. Both may tie their head or not. Everything else is refused, naming the switches."""
    refused = 0
    for cfg in every_combination():
        pre = cfg.norm_position == "pre"
        gpt2 = pre and cfg.norm == "layernorm" and cfg.position_encoding == "learned"
        gpt2 = gpt2 and cfg.mlp != "swiglu" and cfg.bias and cfg.n_kv_head is None
        llama = pre and cfg.norm == "rmsnorm" and cfg.position_encoding == "rope"
        llama = llama and cfg.mlp == "swiglu" and not cfg.bias
        if gpt2 or llama:
            assert choose_architecture(cfg, "transformers") == ("gpt2" if gpt2 else "llama")
            assert choose_architecture(cfg) == ("gpt2" if gpt2 else "llama")
            continue
        refused += 1
        with pytest.raises(ValueError, match="cannot export this model to transformers") as err:
            choose_architecture(cfg, "transformers")
        message = str(err.value)
        assert "GPT2LMHeadModel cannot represent" in message
        assert "LlamaForCausalLM cannot represent" in message
        if not pre:
            assert "norm_position = 'post'" in message
        if cfg.position_encoding == "sinusoidal":
            assert "position_encoding = 'sinusoidal'" in message
        assert choose_architecture(cfg) == choose_architecture(cfg, "gpt") == "gpt"
    # 288 combinations; GPT-2 takes gelu|relu x tied|untied, Llama GQA or not x tied|untied
    assert refused == 2 * 2 * 3 * 3 * 2 * 2 * 2 - 4 - 4


@pytest.mark.parametrize(
    "switches, named",
    [
        (dict(norm_position="post"), ["norm_position = 'post' (GPT-2: 'pre')"]),
        (dict(norm="rmsnorm"), ["norm = 'rmsnorm' (GPT-2: 'layernorm')"]),
        (dict(position_encoding="sinusoidal"), ["position_encoding = 'sinusoidal'"]),
        (dict(position_encoding="rope"), ["position_encoding = 'rope' (GPT-2: 'learned')"]),
        (dict(bias=False), ["bias = False (GPT-2: True)"]),
        (dict(n_kv_head=2), ["n_kv_head = 2 (GPT-2: n_head = 4)"]),
        (dict(mlp="swiglu"), ["mlp = 'swiglu' (GPT-2: 'gelu' or 'relu')"]),
    ],
)
def test_export_as_gpt2_names_what_gpt2_lacks_and_writes_nothing(tmp_path, switches, named):
    model = GPT(
        ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16, **switches)
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel cannot represent") as err:
        model.save_pretrained(tmp_path / "m", architecture="gpt2")
    assert all(n in str(err.value) for n in named), str(err.value)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM cannot represent norm = 'layernorm'"):
        GPT(
            ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=16)
        ).save_pretrained(tmp_path / "m", architecture="llama")
    with pytest.raises(ValueError, match=r"architecture 'onnx' is not valid; choose one of"):
        model.save_pretrained(tmp_path / "m", architecture="onnx")


@pytest.mark.parametrize(
    "switches",
    [dict(norm_position="post"), dict(norm="rmsnorm"), dict(position_encoding="sinusoidal"),
     dict(bias=False, position_encoding="rope"), dict(norm="rmsnorm", position_encoding="learned",
     mlp="swiglu", bias=False)],
)  # fmt: skip
def test_other_switches_are_saved_in_our_layout_that_transformers_refuses(tmp_path, switches):
    """The issue's case: such models used to say GPT2LMHeadModel and load with wrong logits."""
    torch.manual_seed(6)
    model = GPT(
        ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16, **switches)
    )
    assert model.save_pretrained(tmp_path / "m", tokenizer="bytes") == "gpt"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "model_type" not in config and "architectures" not in config
    with pytest.raises(ValueError):  # no model_type: transformers does not guess
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_eos_token_is_the_tokenizers_end_of_text(tmp_path):
    def exported(name, tokenizer=None, **kw):
        cfg = dict(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_embd=8) | kw
        GPT(ModelConfig(**cfg)).save_pretrained(tmp_path / name, tokenizer=tokenizer)
        return json.loads((tmp_path / name / "config.json").read_text())

    padded = exported("a", "bytes", vocab_multiple=64)  # 320 rows: vocab_size - 1 would be 319
    assert padded["eos_token_id"] == padded["bos_token_id"] == 256
    assert exported("b", "bytes", **LLAMA)["eos_token_id"] == 256
    unknown = exported("c")
    assert unknown["eos_token_id"] is None and unknown["bos_token_id"] is None
    assert transformers.AutoConfig.from_pretrained(tmp_path / "c").eos_token_id is None
    llama = exported("d", **LLAMA)
    assert llama["eos_token_id"] is None  # not LlamaConfig's default 2
    assert transformers.AutoConfig.from_pretrained(tmp_path / "d").eos_token_id is None
    assert exported("e", vocab_size=50257, n_embd=4)["eos_token_id"] == 50256  # GPT-2's own


def test_padded_export_loads_into_a_padded_model_with_zero_rows(tmp_path):
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=67, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    padded = GPT.from_pretrained(tmp_path / "m", vocab_multiple=64).eval()
    assert padded.transformer.wte.weight.shape == (128, 16)
    assert torch.equal(padded.transformer.wte.weight[:67], model.transformer.wte.weight)
    assert not padded.transformer.wte.weight[67:].any()
    assert padded.lm_head.weight is padded.transformer.wte.weight
    idx, targets = torch.randint(0, 67, (2, 16)), torch.randint(0, 67, (2, 16))
    with torch.no_grad():
        (l1, loss1), (l2, loss2) = model(idx, targets), padded(idx, targets)
    assert torch.equal(l1, l2) and torch.equal(loss1, loss2)


def test_convert_command_exports_or_refuses_with_status_2(tmp_path, capsys):
    torch.manual_seed(8)
    small = dict(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_embd=8)
    GPT(ModelConfig(**small, **LLAMA)).save_pretrained(tmp_path / "llama", tokenizer="bytes")
    assert convert_main([str(tmp_path / "llama"), str(tmp_path / "out")]) == 0
    assert "(llama architecture)" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 256
    GPT(ModelConfig(**small, norm_position="post")).save_pretrained(tmp_path / "post")
    assert convert_main([str(tmp_path / "post"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "error: cannot export this model to transformers" in err
    assert "norm_position = 'post'" in err and not (tmp_path / "out2").exists()
    assert (
        convert_main([str(tmp_path / "post"), str(tmp_path / "out2"), "--architecture", "gpt"]) == 0
    )


@pytest.mark.parametrize("attention", ["sdpa", "triton", "naive"])
@pytest.mark.parametrize("architecture", ["transformers", "gpt"])
def test_the_export_records_the_sources_attention_backend(tmp_path, attention, architecture):
    """The exporter builds the model with the naive backend (it runs anywhere), but whatever
    reads the export back (sample.py --ckpt, train.init_from) must run the source's own."""
    torch.manual_seed(9)
    small = dict(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_embd=8)
    GPT(ModelConfig(**small)).save_pretrained(tmp_path / "src", tokenizer="bytes")
    # set by hand: a triton model cannot be built on a CPU outside Triton's interpreter
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["gpt_config"]["attention"] = attention
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--architecture", architecture]
    assert convert_main(args) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["gpt_config"]["attention"] == attention
    assert read_model_config(tmp_path / "out").attention == attention
    source, export = (GPT.from_pretrained(tmp_path / d, attention="naive") for d in ("src", "out"))
    idx = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        assert torch.equal(export.eval()(idx), source.eval()(idx))


# ---- config.json files that are malformed or contradict themselves -----------------------


def exported_config(tmp_path, **switches) -> dict:
    GPT(
        ModelConfig(vocab_size=30, block_size=8, n_layer=2, n_head=4, n_embd=16, **switches)
    ).save_pretrained(tmp_path / "m")
    return json.loads((tmp_path / "m" / "config.json").read_text())


def load_with(tmp_path, config: dict):
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return GPT.from_pretrained(tmp_path / "m")


def edited(config: dict, path: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


@pytest.mark.parametrize(
    "switches, key, value, match",
    [
        ({}, "gpt_config.n_layer", "one", r"gpt_config.n_layer must be an integer, got 'one'"),
        ({}, "gpt_config.bias", 1, r"gpt_config.bias must be true or false, got 1"),
        ({}, "gpt_config.n_kv_head", 2.0, r"gpt_config.n_kv_head must be an integer or null"),
        ({}, "gpt_config.n_layers", 2, r"unknown gpt_config keys \['n_layers'\]; valid: vocab"),
        ({}, "gpt_config.n_head", 3, r"model.n_embd \(16\) must be divisible by model.n_head"),
        ({}, "gpt_config", [], r"gpt_config must be an object, got \[\]"),
        ({}, "n_layer", 3, r"n_layer = 3 contradicts gpt_config \(n_layer = 2\)"),
        ({}, "n_layer", "3", r"n_layer must be an integer, got '3'"),
        ({}, "n_positions", 9, r"n_positions = 9 contradicts gpt_config \(block_size = 8\)"),
        ({}, "tie_word_embeddings", False, r"tie_word_embeddings = False contradicts gpt_config"),
        ({}, "model_type", "llama",
         r"model_type = 'llama' contradicts gpt_config: LlamaForCausalLM cannot represent norm ="),
        ({}, "model_type", "bert", r"model_type 'bert' is not supported; valid: gpt2, llama"),
        (LLAMA, "num_key_value_heads", 2,
         r"num_key_value_heads = 2 contradicts gpt_config \(kv_heads = 4\)"),
        (LLAMA, "rope_parameters.rope_theta", 5.0,
         r"rope_parameters.rope_theta = 5.0 contradicts gpt_config \(rope_theta = 10000.0\)"),
        (LLAMA, "rope_parameters.rope_type", "llama3", r"missing key rope_parameters.factor"),
        (LLAMA, "rope_parameters", {"rope_type": "linear", "factor": 2.0},
         r"rope_parameters = \{'type': 'linear'.* contradicts gpt_config"),
        (LLAMA, "intermediate_size", "big", r"intermediate_size must be an integer, got 'big'"),
        (LLAMA, "model_type", "gpt2",
         r"model_type = 'gpt2' contradicts gpt_config: GPT2LMHeadModel cannot represent norm ="),
    ],
)  # fmt: skip
def test_malformed_or_contradicting_config_json_names_file_and_key(
    tmp_path, switches, key, value, match
):
    config = edited(exported_config(tmp_path, **switches), key, value)
    with pytest.raises(ConfigError, match=r"m/config.json: .*" + match):
        load_with(tmp_path, config)


@pytest.mark.parametrize(
    "config, match",
    [
        ({}, r"neither model_type \(a transformers checkpoint: gpt2, llama\) nor gpt_config"),
        ({"model_type": "gpt2"}, r"missing key vocab_size"),
        ({"model_type": "llama", "vocab_size": 5}, r"missing key hidden_size"),
        ({"model_type": 2}, r"model_type must be a string or null, got 2"),
        ({"model_type": "gpt2", "vocab_size": 5, "n_layer": "one", "n_head": 1, "n_embd": 4},
         r"n_layer must be an integer, got 'one'"),
        ({"model_type": "gpt2", "vocab_size": 5, "n_layer": 0, "n_head": 1, "n_embd": 4},
         r"model.n_layer must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_malformed_transformers_config_names_file_and_key(tmp_path, config, match):
    exported_config(tmp_path)
    with pytest.raises(ConfigError, match=r"m/config.json: " + match):
        load_with(tmp_path, config)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported; valid: 'silu'"),
        (dict(attention_bias=True), r"attention_bias = true is not supported"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), r"rope_type 'longrope'"),
        (dict(head_dim=4), r"head_dim = 4 is not supported; it must be hidden_size / num_"),
    ],
)  # fmt: skip
def test_unsupported_llama_settings_are_named(tmp_path, change, match):
    config = dict(model_type="llama", vocab_size=20, hidden_size=32, intermediate_size=40,
                  num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=match):
        load_with(tmp_path, {**config, **change})


def test_llama_weights_that_do_not_fit_are_named(tmp_path):
    torch.manual_seed(9)
    cfg = family_config("llama-mqa")
    transformers_model(cfg).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: transformer.h.0.attn.c_attn.weight has shape \(60, 40\), "
        r"the config needs \(80, 40\)",
    ):
        GPT.from_pretrained(tmp_path / "hf")
