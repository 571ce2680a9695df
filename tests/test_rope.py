"""RoPE scaling (gpt/rope.py): inverse frequencies and attention factors against
transformers' own ``ROPE_INIT_FUNCTIONS`` on a grid, factor 1 bit for bit, every bad
sub-key named, and the scaled model everywhere it runs: cached decoding past the original
length, every CPU backend, torch.compile, the Llama export and import."""

import itertools
import json

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gpt import GPT, ModelConfig
from gpt.attention import attention_status
from gpt.config import ConfigError
from gpt.config_io import load_config, to_toml
from gpt.generate import generate
from gpt.model import KVCache
from gpt.rope import inverse_frequencies, rope_tables

transformers.logging.set_verbosity_error()
BACKENDS = [name for name, why in attention_status().items() if why is None]
EXTRA = {  # each type's own keys, not at their defaults where that is possible
    "linear": {},
    "dynamic": {},
    "yarn": dict(beta_fast=24, beta_slow=2),
    "llama3": dict(low_freq_factor=1.0, high_freq_factor=4.0),
}
LLAMA = dict(norm="rmsnorm", position_encoding="rope", mlp="swiglu", bias=False)
SMALL = dict(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32)
ROPE = dict(position_encoding="rope")


def hf_config(kind: str, head_dim: int, theta: float, factor: float, original: int, **extra):
    """The transformers config whose rope_parameters are ours; dynamic reads its original
    length from max_position_embeddings, the others from the parameters."""
    params = dict(rope_type=kind, rope_theta=theta, factor=float(factor), **extra)
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
        max_position_embeddings=original if kind == "dynamic" else int(factor * original),
        rope_parameters=params,
    )  # fmt: skip


def assert_same_frequencies(kind, head_dim, theta, factor, original, seq_len=None, **extra):
    theirs, their_factor = ROPE_INIT_FUNCTIONS[kind](
        hf_config(kind, head_dim, theta, factor, original, **extra), "cpu", seq_len=seq_len
    )
    scaling = dict(type=kind, factor=factor, original_max_position_embeddings=original, **extra)
    ours, our_factor = inverse_frequencies(head_dim, theta, scaling, seq_len)
    assert ours.shape == theirs.shape == (head_dim // 2,)
    relative = ((ours - theirs.double()) / theirs.double()).abs().max().item()
    assert relative <= 1e-6, (kind, head_dim, theta, factor, original, seq_len, extra)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)
    return ours, our_factor


GRID = list(itertools.product((32, 64, 128), (1e4, 5e5), (2, 4, 8, 16), (128, 1024, 4096)))


@pytest.mark.parametrize("kind", list(EXTRA))
def test_inverse_frequencies_and_attention_factor_equal_transformers(kind):
    factors = set()
    for head_dim, theta, factor, original in GRID:
        lengths = [None]
        if kind == "dynamic":  # below, at and past the original length
            lengths = [original // 2, original, original + 1, 3 * original, factor * original]
        for seq_len in lengths:
            _, attention = assert_same_frequencies(
                kind, head_dim, theta, factor, original, seq_len, **EXTRA[kind]
            )
            factors.add(attention)
    if kind == "yarn":  # 0.1 ln(s) + 1, one per factor
        assert len(factors) == 4 and min(factors) > 1
    else:
        assert factors == {1.0}


@pytest.mark.parametrize(
    "extra",
    [
        dict(truncate=False),
        dict(mscale=0.707, mscale_all_dim=0.707),
        dict(mscale=1.0, mscale_all_dim=0.5),
        dict(attention_factor=1.25),
        dict(beta_fast=64, beta_slow=0.5),
    ],
)
def test_yarn_options_equal_transformers(extra):
    for head_dim, theta, factor, original in GRID[::5]:
        assert_same_frequencies("yarn", head_dim, theta, factor, original, **extra)


def unscaled(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as gpt/model.py computed them before rope scaling existed."""
    f64 = dict(dtype=torch.float64)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, **f64) / head_dim)
    angles = torch.arange(length, **f64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("kind", list(EXTRA))
def test_factor_one_gives_the_unscaled_tables_bit_for_bit(kind):
    for head_dim, theta in itertools.product((32, 64, 128), (1e4, 5e5)):
        scaling = dict(type=kind, factor=1, original_max_position_embeddings=64, **EXTRA[kind])
        cos, sin = rope_tables(64, head_dim, theta, scaling)
        want_cos, want_sin = unscaled(64, head_dim, theta)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    scaling["original_max_position_embeddings"] = SMALL["block_size"]
    model = GPT(ModelConfig(**SMALL, **ROPE, rope_scaling=scaling))
    assert model.cfg.max_positions == SMALL["block_size"]
    want_cos, want_sin = unscaled(SMALL["block_size"], 8, 10000.0)
    assert torch.equal(model.rope_cos, want_cos) and torch.equal(model.rope_sin, want_sin)


SCALED = {  # original 16 = block_size, factor 4: the model runs 64 positions
    kind: dict(type=kind, factor=4, original_max_position_embeddings=16, **EXTRA[kind])
    for kind in EXTRA
}


def make(kind: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **ROPE, "rope_scaling": SCALED[kind], **kw})).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that attention is not uniform
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.mark.parametrize("kind", list(EXTRA))
def test_scaling_is_active_when_block_size_equals_the_original_length(kind):
    model = make(kind)
    assert model.cfg.block_size == 16 and model.cfg.max_positions == 64
    cos, sin = unscaled(64, 8, 10000.0)
    if kind == "dynamic":  # unscaled up to the original length, scaled past it
        assert torch.equal(model.rope_rows(0, 16)[0], cos[:16])
        assert not torch.allclose(model.rope_rows(0, 17)[0], cos[:17])
    else:
        assert not torch.allclose(model.rope_cos[:16], cos[:16])
        assert not torch.allclose(model.rope_sin, sin)


def test_yarn_attention_factor_scales_cos_and_sin():
    model, inv = make("yarn"), inverse_frequencies(8, 10000.0, SCALED["yarn"])
    angles = torch.arange(64, dtype=torch.float64)[:, None] * inv[0]
    assert inv[1] == pytest.approx(0.1 * torch.tensor(4.0).log().item() + 1)
    torch.testing.assert_close(model.rope_cos, (angles.cos() * inv[1]).float(), rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, (angles.sin() * inv[1]).float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_cached_decoding_past_the_original_length_equals_a_full_forward(kind):
    model = make(kind)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 60))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, batch_size=2)
        steps = [model(idx[:, :20], kv_cache=cache)]  # a prefill past the original length
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(20, 60)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
    prompt = idx[:, :5]  # the decode step (generate.py) reads the same tables
    assert torch.equal(
        generate(model, prompt, 50, temperature=0),
        generate(model, prompt, 50, temperature=0, use_cache=False),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_scaled_model_past_the_original_length(backend):
    model, reference = make("yarn", attention=backend), make("yarn", attention="naive")
    idx = torch.randint(0, SMALL["vocab_size"], (1, 40))
    with torch.no_grad():
        full = model(idx)
        assert (full - reference(idx)).abs().max().item() <= 1e-4
        cache = KVCache(model.cfg, batch_size=1)  # a chunked prefill, then one token
        steps = [model(idx[:, :20], kv_cache=cache), model(idx[:, 20:39], kv_cache=cache)]
        steps.append(model(idx[:, 39:], kv_cache=cache))
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_a_sequence_longer_than_the_scaled_context_is_an_error():
    model = make("yarn")
    with pytest.raises(ValueError, match="sequence length 65 exceeds the 64 positions of model"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        GPT(ModelConfig(**SMALL, **ROPE))(torch.zeros(1, 17, dtype=torch.long))


def test_compiled_forward_equals_eager():
    model = make("yarn")
    idx = torch.randint(0, SMALL["vocab_size"], (1, 48))
    with torch.no_grad():
        compiled = torch.compile(model)
        assert (compiled(idx) - model(idx)).abs().max().item() <= 1e-4


def export(model: GPT, path) -> transformers.LlamaForCausalLM:
    assert model.save_pretrained(path, architecture="llama") == "llama"
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", list(EXTRA))
def test_llama_export_gives_our_logits_past_the_original_length(tmp_path, kind):
    model = make(kind, **LLAMA, seed=1)
    theirs = export(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == kind
    assert config["rope_scaling"] == config["rope_parameters"]  # transformers 4 reads this one
    idx = torch.randint(0, SMALL["vocab_size"], (2, 48))  # 3 x the original length
    with torch.no_grad():
        assert (theirs(idx).logits - model(idx)).abs().max().item() <= 1e-4
    back = GPT.from_pretrained(tmp_path / "m")
    assert back.cfg.resolved_rope_scaling == model.cfg.resolved_rope_scaling
    assert back.cfg.max_positions == 64


def test_dynamic_cached_decoding_matches_transformers(tmp_path):
    """transformers grows dynamic NTK's base with the longest position seen: a cached key
    keeps the rotation of its own step, so cached decoding differs from a full forward past
    the original length; ours does the same, step for step."""
    model = make("dynamic", **LLAMA, seed=2)
    theirs = export(model, tmp_path / "m")
    idx = torch.randint(0, SMALL["vocab_size"], (1, 40))
    with torch.no_grad():
        cache = KVCache(model.cfg, batch_size=1)
        ours = [model(idx[:, :10], kv_cache=cache)]
        ours += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(10, 40)]
        out = theirs(idx[:, :10], use_cache=True)
        want, past = [out.logits], out.past_key_values
        for t in range(10, 40):
            out = theirs(idx[:, t : t + 1], past_key_values=past, use_cache=True)
            want.append(out.logits)
            past = out.past_key_values
        cached, want = torch.cat(ours, dim=1), torch.cat(want, dim=1)
        assert (cached - want).abs().max().item() <= 1e-4
        fresh = export(model, tmp_path / "m")  # a fresh rotary state: full forward of 40
        full = model(idx)
        assert (full - fresh(idx).logits).abs().max().item() <= 1e-4
        # a full forward of 40 scales every position, the first ones too; a cached token
        # keeps the base of the length at its own step
        assert (full[:, :16] - model(idx[:, :16])).abs().max().item() > 1e-3
        assert (full[:, -1] - cached[:, -1]).abs().max().item() > 1e-3
    prompt = idx[:, :5]  # the eager decode step follows the same rule
    want = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(generate(model, prompt, 40, temperature=0), want)


@pytest.mark.parametrize("kind", list(EXTRA))
def test_a_hugging_face_llama_with_rope_scaling_imports(tmp_path, kind):
    torch.manual_seed(3)
    config = hf_config(kind, 8, 10000.0, 4, 16, **EXTRA[kind])
    config.update(dict(vocab_size=61, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, hidden_size=32, intermediate_size=40))  # fmt: skip
    config.max_position_embeddings = 16
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    assert ours.cfg.resolved_rope_scaling["type"] == kind
    assert ours.cfg.max_positions == 64
    idx = torch.randint(0, 61, (1, 48))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


# ---- the key: TOML, command line, and every bad value named --------------------------------


def test_rope_scaling_reads_from_toml_and_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nposition_encoding = "rope"\nrope_scaling = {type = "yarn", factor = 4, '
        "original_max_position_embeddings = 1024, beta_fast = 32, beta_slow = 1}\n"
    )
    cfg = load_config(path)
    assert cfg.model.rope_scaling["type"] == "yarn" and cfg.model.max_positions == 4 * 1024
    (tmp_path / "back.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "back.toml").model == cfg.model
    cli = load_config(
        path,
        [
            '--model.rope_scaling={type = "linear", factor = 2, original_max_position_'
            "embeddings = 1024}"
        ],  # fmt: skip
    )
    assert cli.model.max_positions == 2048
    assert ModelConfig().rope_scaling == {} and ModelConfig().max_positions == 1024


@pytest.mark.parametrize(
    "scaling, match",
    [
        (dict(factor=4), r"model.rope_scaling.type is missing; choose one of linear, dynamic"),
        (dict(type="ntk", factor=4), r"model.rope_scaling.type = 'ntk' is not valid; choose"),
        (dict(type="linear", original_max_position_embeddings=8),
         r"model.rope_scaling.factor is missing; type 'linear' needs type, factor, original"),
        (dict(type="yarn", factor=4),
         r"model.rope_scaling.original_max_position_embeddings is missing"),
        (dict(type="linear", factor=0.5, original_max_position_embeddings=8),
         r"model.rope_scaling.factor must be a number >= 1, got 0.5"),
        (dict(type="linear", factor=True, original_max_position_embeddings=8),
         r"model.rope_scaling.factor must be a number >= 1, got True"),
        (dict(type="linear", factor=2, original_max_position_embeddings=8.5),
         r"original_max_position_embeddings must be a positive integer .*got 8.5"),
        (dict(type="linear", factor=2, original_max_position_embeddings=0),
         r"original_max_position_embeddings must be a positive integer .*got 0"),
        (dict(type="linear", factor=2, original_max_position_embeddings=8, beta_fast=32),
         r"model.rope_scaling.beta_fast is not a key of type 'linear'; valid: type, factor, "),
        (dict(SCALED["yarn"], beta_fast=1, beta_slow=2),
         r"model.rope_scaling.beta_fast \(1\) must be larger than model.rope_scaling.beta_slow"),
        (dict(SCALED["yarn"], beta_slow=0), r"model.rope_scaling.beta_slow must be a number > 0"),
        (dict(SCALED["yarn"], truncate=1), r"model.rope_scaling.truncate must be true or false"),
        (dict(SCALED["yarn"], mscale=1.0),
         r"model.rope_scaling.mscale needs model.rope_scaling.mscale_all_dim too"),
        (dict(SCALED["yarn"], attention_factor=-1.0),
         r"model.rope_scaling.attention_factor must be a number > 0"),
        (dict(SCALED["llama3"], low_freq_factor=4.0, high_freq_factor=1.0),
         r"model.rope_scaling.high_freq_factor \(1\) must be larger than .*low_freq_factor \(4\)"),
        (dict(SCALED["llama3"], low_freq_factor="one"),
         r"model.rope_scaling.low_freq_factor must be a number > 0, got 'one'"),
    ],
)  # fmt: skip
def test_a_bad_rope_scaling_names_the_sub_key(scaling, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**SMALL, **ROPE, rope_scaling=scaling).validate()


def test_rope_scaling_needs_rotary_positions():
    with pytest.raises(ConfigError, match=r"model.position_encoding = 'learned'; set it to 'ro"):
        ModelConfig(**SMALL, rope_scaling=SCALED["linear"]).validate()


def test_a_dynamic_model_exports_to_llama_only_at_its_original_length(tmp_path):
    model = GPT(ModelConfig(**{**SMALL, **LLAMA, "block_size": 32}, rope_scaling=SCALED["dynamic"]))
    with pytest.raises(ValueError, match=r"'dynamic' with original_max_position_embeddings = 16"):
        model.save_pretrained(tmp_path / "m", architecture="llama")
    assert model.save_pretrained(tmp_path / "m") == "gpt"  # ours keeps it
    assert GPT.from_pretrained(tmp_path / "m").cfg.max_positions == 64
