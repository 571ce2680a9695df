"""Typed configuration: precedence, every shipped config, round trip, and every error path."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt import GPT
from gpt.config import (
    CHOICES,
    SECTION_TYPES,
    Config,
    ConfigError,
    ModelConfig,
    _toml_value,
    config_help,
    load_config,
    save_config,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_file_command_line(tmp_path):
    path = write(tmp_path, "[model]\nn_layer = 3\nn_head = 2\n[optim]\nlr = 1\n")
    cfg = load_config(path, ["--model.n_head=4", "--train.dtype=bf16"])
    assert cfg.model.n_layer == 3  # file
    assert cfg.model.n_head == 4  # command line beats file
    assert cfg.train.dtype == "bf16"  # command line beats default
    assert cfg.model.n_embd == ModelConfig().n_embd  # default
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int literal for a float


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    with torch.device("meta"):  # shapes only: no memory or time spent on 1.5B weights
        model = GPT(cfg.model)
    assert model.num_params() > 0


def test_gpt2_124m_has_exactly_124439808_parameters():
    """The real parameters; the shipped config pads the vocabulary to 50304 rows, storage
    that no token uses (47 x 768 more elements), which num_params leaves out."""
    with torch.device("meta"):
        model = GPT(load_config(ROOT / "configs" / "gpt2-124m.toml").model)
    assert model.cfg.vocab_multiple == 64 and model.transformer.wte.weight.shape[0] == 50304
    assert model.num_params() == 124_439_808
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 47 * 768


@pytest.mark.parametrize("tied", [True, False])
def test_padding_rows_are_not_counted_as_parameters(tied):
    def make(multiple):
        cfg = ModelConfig(
            vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tied
        )
        return GPT(dataclasses.replace(cfg, vocab_multiple=multiple))

    padded, plain = make(64), make(1)
    stored = sum(p.numel() for p in padded.parameters())
    assert stored == sum(p.numel() for p in plain.parameters()) + 14 * 16 * (1 if tied else 2)
    assert padded.num_params() == plain.num_params()
    assert padded.num_params(non_embedding=True) == plain.num_params(non_embedding=True)


@pytest.mark.parametrize(
    "name, params",
    [("gpt2-350m", 354_823_168), ("gpt2-774m", 774_030_080), ("gpt2-1.5b", 1_557_611_200)],
)
def test_gpt2_sizes_match_hugging_face_counts(name, params):
    with torch.device("meta"):
        model = GPT(load_config(ROOT / "configs" / f"{name}.toml").model)
    assert model.num_params() == params


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(
        None,
        [
            "--model.n_kv_head=4",
            '--train.out_dir=some where/with "quotes"',
            '--data.extra_val={law = "out/law", "med-x" = "out/med"}',
            "--deepspeed.zero_optimization.stage=2",
            "--train.compile=true",
        ],
    )
    save_config(cfg, tmp_path / "resolved.toml")
    assert load_config(tmp_path / "resolved.toml") == cfg
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}
    assert cfg.data.extra_val == {"law": "out/law", "med-x": "out/med"}
    assert load_config(None) == Config() and "[deepspeed]" in to_toml(Config())


@pytest.mark.parametrize(
    "text", ["😀", "🚀 out/ünï", 'tab\tnew\nline "q" \\ del\x7f bell\x07', "", "\U0010fffd"]
)
def test_every_written_config_reads_back_with_any_text(tmp_path, text):
    """Characters outside the Basic Multilingual Plane, control characters, quotes and
    backslashes, in a list, a table and a plain string: the run's own config.toml must read
    back to the same Config."""
    cfg = load_config(None, [f"--train.out_dir={text}x"])
    cfg.train.sample_prompts = [text, "ROMEO:"]
    cfg.data.extra_val = {text or "k": f"out/{text}"}
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def test_text_toml_cannot_hold_is_refused():
    cfg = Config()
    cfg.train.out_dir = "a\udcff"  # the command line refuses it first (below)
    with pytest.raises(ConfigError, match="holds a lone surrogate"):
        to_toml(cfg)


def test_unreadable_config_files_and_overrides_are_one_line_errors(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[train]\nout_dir = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=rf"{bad}: not UTF-8 text \(byte 22"):
        load_config(bad)
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization is 5, not a table"):
        load_config(
            None, ["--deepspeed.zero_optimization=5", "--deepspeed.zero_optimization.stage=1"]
        )
    with pytest.raises(ConfigError, match="--train.out_dir holds bytes that are not UTF-8"):
        load_config(None, ["--train.out_dir=" + b"caf\xe9".decode("utf-8", "surrogateescape")])


def test_none_resets_an_optional_value():
    assert (
        load_config(None, ["--model.n_kv_head=2", "--model.n_kv_head=none"]).model.n_kv_head is None
    )


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "[model]\nn_layers = 3\n",
            r"c.toml: unknown key model.n_layers; valid keys of \[model\]: vocab_size, .*n_layer",
        ),
        (
            "[modle]\nn_layer = 3\n",
            r"c.toml: unknown section \[modle\]; valid: model, data, train, optim, finetune, "
            "bench, deepspeed",
        ),
        ('[model]\nn_layer = "3"\n', r"c.toml: model.n_layer must be int, got '3' \(str\)"),
        ("[model]\nn_layer = 3.0\n", r"model.n_layer must be int, got 3.0 \(float\)"),
        ("[model]\nbias = 1\n", r"model.bias must be bool, got 1 \(int\)"),
        ("[optim]\nlr = true\n", r"optim.lr must be float, got True \(bool\)"),
        ("[data]\nextra_val = {law = 3}\n", r"data.extra_val must be dict\[str, str\]"),
        ("n_layer = 3\n", r"top-level key 'n_layer' must be a \[section\]; valid sections: model"),
        ("[model\n", r"c.toml: not valid TOML"),
    ],
)
def test_bad_file_names_the_key_and_what_is_valid(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "arg, match",
    [
        (
            "--train.max_step=3",
            r"command line: unknown key train.max_step; valid keys of \[train\]: out_dir, max_ste",
        ),
        (
            "--train.max_steps=many",
            r"command line: train.max_steps must be int, got 'many' \(str\)",
        ),
        ("--train.max_steps", r"has no value; write --train.max_steps=VALUE"),
        ("--max_steps=3", r"expected --section.key=value"),
        ("train.max_steps=3", r"expected --section.key=value"),
        ("--model.n_kv_head=two", r"model.n_kv_head must be int or none, got 'two'"),
    ],
)
def test_bad_override_names_the_key_and_what_is_valid(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [arg])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="config file nowhere.toml does not exist"):
        load_config("nowhere.toml")


def test_help_lists_every_key_with_its_description():
    text = config_help()
    for section in ("model", "data", "train", "optim"):
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            line = next(x for x in text.splitlines() if f"--{section}.{f.name}=" in x)
            assert f.metadata["help"] in line


def run_train(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def test_train_help_and_config_errors_exit_non_zero():
    helped = run_train("--help")
    assert helped.returncode == 0 and "--train.micro_batch_size=<int>" in helped.stdout
    bad = run_train("configs/tiny.toml", "--model.n_layers=2")
    assert bad.returncode == 2
    assert "unknown key model.n_layers; valid keys of [model]" in bad.stderr
    bad = run_train("configs/tiny.toml", "--model.norm=batchnorm")
    assert bad.returncode == 2 and "model.norm = 'batchnorm' is not valid" in bad.stderr


# A value outside the valid range for every key whose range is not in its field's metadata
# (numeric ranges come from the metadata; see bad_values). None: any value of the right type
# is valid, so there is nothing out of range to try.
SPECIAL = {
    "model.bias": None,
    "model.tie_embeddings": None,
    "model.attention": ("flash9", "model.attention = 'flash9' cannot be used here"),
    "model.n_kv_head": (0, "model.n_kv_head (0) must be a positive divisor"),
    "data.dir": ("/no/such/dir", "data.dir: data directory /no/such/dir does not exist"),
    "data.extra_val": ({"x": "/no/such/dir"}, "data.extra_val.x: data directory /no/such/dir"),
    "train.out_dir": ("", "train.out_dir must not be empty"),
    "train.init_from": ("/no/such/model", "train.init_from = '/no/such/model': no such file"),
    "train.compile": None,
    "train.universal_checkpoint": None,
    "train.wandb": None,
    "train.wandb_project": None,
    "train.sample_prompts": None,
    "bench.backends": (["fast"], "bench.backends: unknown attention backend(s) fast"),
    "bench.compile": None,
    "data.name": None,
    "finetune.freeze_embeddings": (True, "finetune.freeze_embeddings = true: adapting needs"),
    "finetune.lora_targets": (["attn.q"], "finetune.lora_targets = ['attn.q']: choose one"),
    "finetune.replay_dir": ("/no/such", "finetune.replay_fraction = 0.0 and finetune.replay_dir"),
}


def bad_values(section: str, f: dataclasses.Field) -> list[tuple[object, str]]:
    """Out-of-range values of one key and the message each must produce."""
    key, meta = f"{section}.{f.name}", f.metadata
    if key in SPECIAL:
        return [] if SPECIAL[key] is None else [SPECIAL[key]]
    if key in CHOICES:
        return [("bogus", f"{key} = 'bogus' is not valid; choose one of")]
    out = []
    for bound, delta in (("min", -1), ("above", 0), ("max", 1), ("below", 0)):
        if bound in meta:
            out.append((meta[bound] + delta, f"{key} must be "))
    if f.type in (float, "float"):
        out.append((float("nan"), f"{key} must be a finite number, got nan"))
    assert out, f"{key}: no out-of-range value known; add a range or a SPECIAL entry"
    return out


def test_every_key_of_every_section_refuses_an_out_of_range_value(tmp_path, data_dir, capsys):
    """Status 2 before any model is built, and the message names the key."""
    from gpt.cli import train

    text = (
        f"[model]\nvocab_size = 257\nblock_size = 16\nn_layer = 1\nn_head = 2\nn_embd = 8\n"
        f'[data]\ndir = "{data_dir}"\n[train]\nout_dir = "{tmp_path / "run"}"\nwandb = false\n'
    )
    path = write(tmp_path, text)
    tried = 0
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            for value, message in bad_values(section, f):
                arg = f"--{section}.{f.name}={_toml_value(value)}"
                assert train.main([str(path), arg]) == 2, arg
                err = capsys.readouterr().err
                assert message in err and f"{section}.{f.name}" in err, (arg, err)
                tried += 1
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert tried >= 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.min_lr=0.1", "--optim.lr=0.01"], "optim.min_lr (0.1) must be at most optim.lr"),
        (["--deepspeed.zero_optimization.stage=4"], "deepspeed.zero_optimization.stage = 4"),
        (["--model.block_size=100000"], "split 'train' has"),
        (["--train.global_batch_size=7"], "train.global_batch_size = 7 but micro_batch_size"),
    ],
)
def test_combinations_are_refused_before_any_work(tmp_path, data_dir, capsys, args, message):
    from gpt.cli import train

    path = write(tmp_path, f'[data]\ndir = "{data_dir}"\n[model]\nvocab_size = 257\n')
    assert train.main([str(path), f"--train.out_dir={tmp_path / 'run'}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluation_on_an_empty_validation_split_is_refused(tmp_path, capsys):
    from gpt.cli import train
    from gpt.data.prepare import prepare

    (tmp_path / "doc.txt").write_text("a small corpus with no validation split " * 20)
    prepare([str(tmp_path / "doc.txt")], tmp_path / "d", encoding="bytes", val_fraction=0.0,
            progress=False)  # fmt: skip
    path = write(tmp_path, f'[data]\ndir = "{tmp_path / "d"}"\n[model]\nvocab_size = 257\n'
                 "block_size = 16\n")  # fmt: skip
    assert train.main([str(path), f"--train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "split 'val' has 0 tokens" in err and "set train.eval_interval = 0" in err


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses: regenerate it with
    `python -m gpt.config > docs/configuration.md` when a key changes."""
    from gpt.config import config_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == config_markdown()
