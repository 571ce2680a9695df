"""gpt/config_io.py: precedence, round trips through TOML, the command line, --help, the
reference page, and every error path of reading a config."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.config import Config, ConfigError, ModelConfig
from gpt.config_io import config_help, config_markdown, load_config, save_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


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
            "deepspeed",
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
        # a table that is not TOML says why (a source listed twice, a missing comma)
        ("--data.mixture={a = 1, a = 2}", r"data.mixture must be dict\[str, float\], got '\{a = "
         r"1, a = 2\}' \(str\), which is not a TOML value: Duplicate inline table key 'a'$"),
        ("--data.sources={web = \"w\" code = \"c\"}", r"not a TOML value: Unclosed inline table$"),
    ],
)  # fmt: skip
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


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses: regenerate it with
    `python -m gpt.config_io > docs/configuration.md` when a key changes."""
    assert (ROOT / "docs" / "configuration.md").read_text() == config_markdown()


OLD_BENCH = "[bench]\nsteps = 0\nwarmup = 3\nbackends = []\ncompile = [false, true]\n"


def test_an_old_config_with_the_retired_bench_table_still_loads(tmp_path):
    """Every config.toml saved before bench/trainer.py holds [bench] with steps = 0 (train):
    read and dropped, it is the same config, and saved again without it."""
    old = write(tmp_path, "[model]\nn_layer = 3\n" + OLD_BENCH + "[optim]\nlr = 1\n")
    cfg = load_config(old)
    assert cfg == load_config(write(tmp_path, "[model]\nn_layer = 3\n[optim]\nlr = 1\n", "n"))
    assert not hasattr(cfg, "bench") and "[bench]" not in to_toml(cfg)
    assert "bench" not in config_help() and "[bench]" not in config_markdown()


@pytest.mark.parametrize(
    "text, args, match",
    [
        ("[bench]\nsteps = 10\n", [], r"c.toml: bench.steps = 10: \[bench\] is retired: .*"
         r"`python bench/trainer.py CONFIG --steps N.*\. Delete the \[bench\] table from "),
        ("[bench]\nsteps = false\n", [], r"c.toml: bench.steps = False: \[bench\] is retired"),
        ("[bench]\nsteps = 0.0\n", [], r"c.toml: bench.steps = 0.0: \[bench\] is retired"),
        ("[bench]\nsteps = -1\n", [], r"c.toml: bench.steps = -1: \[bench\] is retired"),
        ("[bench]\nsteps = 0\nwarmpu = 1\n", [], r"c.toml: unknown key bench.warmpu; \[bench\] "
         "is retired"),
        ("", ["--bench.steps=10"], r"command line: --bench.steps: \[bench\] is retired: train.py "
         "has no benchmark mode any more; its settings are flags of `python bench/trainer.py"),
        (OLD_BENCH, ["--bench.backends=[\"sdpa\"]"], r"command line: --bench.backends: "),
    ],
)  # fmt: skip
def test_asking_for_the_retired_benchmark_mode_says_what_to_run(tmp_path, text, args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), args)
