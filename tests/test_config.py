"""gpt/config.py: every shipped config, every key's range, every combination and every
validation error path."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from gpt import GPT
from gpt.config import CHOICES, SECTION_TYPES, ConfigError, ModelConfig
from gpt.config_io import load_config, save_config, toml_value

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


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


# A value outside the valid range for every key whose range is not in its field's metadata
# (numeric ranges come from the metadata; see bad_values). None: any value of the right type
# is valid, so there is nothing out of range to try.
SPECIAL = {
    "model.bias": None,
    "model.tie_embeddings": None,
    "model.attention": ("flash9", "model.attention = 'flash9' cannot be used here"),
    "model.n_kv_head": (0, "model.n_kv_head (0) must be a positive divisor"),
    "model.sdpa_kernels": (["cudnnn"], "model.sdpa_kernels: unknown SDPA kernel(s) 'cudnnn'"),
    "model.rope_scaling": ({"type": "ntk"}, "model.rope_scaling.type = 'ntk' is not valid"),
    "data.dir": ("/no/such/dir", "data.dir: data directory /no/such/dir does not exist"),
    "data.extra_val": ({"x": "/no/such/dir"}, "data.extra_val.x: data directory /no/such/dir"),
    "data.mixture": ({"web": -1.0}, "data.mixture.web = -1.0: a weight must be a number > 0"),
    "data.sources": ({"x": "/no/such"}, "data.sources = {'x': '/no/such'} but data.mixture is"),
    "train.out_dir": ("", "train.out_dir must not be empty"),
    "train.init_from": ("/no/such/model", "train.init_from = '/no/such/model': no such file"),
    "train.compile": None,
    "train.activation_checkpointing": None,
    "train.universal_checkpoint": None,
    "train.wandb": None,
    "train.wandb_project": None,
    "train.sample_prompts": None,
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
                arg = f"--{section}.{f.name}={toml_value(value)}"
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


# -- [deepspeed]: only what the trainer honours ----------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ['--deepspeed.optimizer={type = "SGD"}'],
            "deepspeed.optimizer is ignored: the trainer always steps its own AdamW "
            "(gpt/train/optim.py); remove it and set optim.lr, optim.beta1",
        ),
        (["--deepspeed.optimizer.type=SGD"], "deepspeed.optimizer is ignored"),
        (['--deepspeed.scheduler.type="WarmupLR"'], "set optim.lr, optim.warmup_steps"),
        (["--deepspeed.gradient_clipping=0.5"], "remove it and set optim.grad_clip"),
        (["--deepspeed.train_batch_size=8"], "and set train.global_batch_size"),
        (["--deepspeed.gradient_accumulation_steps=2"], "and set train.grad_accum"),
        (["--deepspeed.steps_per_print=1"], "remove it and set train.log_interval"),
        (["--deepspeed.fp16.enabled=true"], "set train.dtype = 'fp16'"),
        (["--deepspeed.torch_autocast.enabled=true"], "set train.dtype = 'bf16'"),
        (["--deepspeed.zero_allow_untested_optimizer=false"], "is set by the trainer"),
        (
            ['--deepspeed.zero_optimization.offload_optimizer.device="cpu"'],
            "deepspeed.zero_optimization.offload_optimizer is not supported",
        ),
        (
            ["--deepspeed.zero_optimization.stage=true"],
            "deepspeed.zero_optimization.stage = true is not valid; use an integer in [0, 3]",
        ),
        (["--deepspeed.zero_optimization.stage=1.0"], "stage = 1.0 is not valid"),
        (['--deepspeed.zero_optimization.stage="2"'], "stage = '2' is not valid"),
        (["--deepspeed.zero_optimization.stage=-1"], "stage = -1 is not valid"),
        (["--deepspeed.zero_optimization.overlap_comm=1"], "overlap_comm = 1 is not valid; use "),
        (["--deepspeed.zero_optimization.reduce_bucket_size=5e8"], "an integer >= 1"),
        (["--deepspeed.bf16.enabled=1", "--train.dtype=bf16"], "bf16.enabled = 1 is not valid"),
        (["--deepspeed.wall_clock_breakdown=yes"], "wall_clock_breakdown = 'yes' is not valid"),
        (['--deepspeed.data_types.grad_accum_dtype="fp64"'], "one of 'fp32', 'fp16', 'bf16'"),
        (["--deepspeed.fp16.loss_scale=128"], "only used with train.dtype = 'fp16' (now 'fp32')"),
        (
            ["--deepspeed.zero_optimisation.stage=2"],
            "deepspeed.zero_optimisation is not a key this trainer passes on to DeepSpeed; "
            "valid keys of [deepspeed]: bf16, communication_data_type",
        ),
        (
            ["--deepspeed.zero_optimization.stages=2"],
            "valid keys of [deepspeed.zero_optimization]: allgather_bucket_size",
        ),
        (["--deepspeed.zero_optimization=2"], "deepspeed.zero_optimization = 2 must be a table"),
        (["--deepspeed.bf16.enabled=true"], "needs train.dtype = 'bf16', got 'fp32'"),
    ],
)
def test_deepspeed_keys_the_trainer_would_not_honour_are_refused(args, message):
    cfg = load_config(None, args)
    with pytest.raises(ConfigError) as err:
        cfg.validate(1)
    assert message in str(err.value)


def test_deepspeed_keys_it_passes_on_reach_the_engine_config():
    from gpt.train.engine import deepspeed_config

    args = [
        "--train.dtype=fp16",
        "--deepspeed.zero_optimization.stage=2",
        "--deepspeed.zero_optimization.overlap_comm=true",
        "--deepspeed.zero_optimization.reduce_bucket_size=50_000_000",
        "--deepspeed.fp16.loss_scale=0",
        "--deepspeed.fp16.initial_scale_power=12",
        '--deepspeed.communication_data_type="fp32"',
        "--deepspeed.wall_clock_breakdown=true",
    ]
    cfg = load_config(None, args)
    cfg.validate(1)
    ds = deepspeed_config(cfg, 1)
    assert ds["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "reduce_bucket_size": 50_000_000,
    }
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    assert ds["communication_data_type"] == "fp32" and ds["wall_clock_breakdown"] is True
    bf16 = load_config(None, ["--train.dtype=bf16", "--deepspeed.bf16.enabled=true"])
    bf16.validate(1)
    assert deepspeed_config(bf16, 1)["bf16"] == {"enabled": True}


def _leaves(table: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_every_key_the_trainer_writes_is_either_refused_or_checked():
    """A key deepspeed_config() derives must be refused in [deepspeed] (the user's value
    would be overridden, or override the trainer's), or be one it passes on and checks."""
    from gpt.train.engine import DEEPSPEED_KEYS, DEEPSPEED_REFUSED, deepspeed_config

    for dtype in ("fp32", "bf16", "fp16"):
        cfg = load_config(None, [f"--train.dtype={dtype}"])
        for key in _leaves(deepspeed_config(cfg, 2)):
            parts = key.split(".")
            refused = any(
                ".".join(parts[:n]) in DEEPSPEED_REFUSED for n in range(1, len(parts) + 1)
            )
            assert refused or key in DEEPSPEED_KEYS, key


def test_documented_deepspeed_settings_are_accepted():
    """Every --deepspeed.* override in the README and docs/, and every shipped config's
    [deepspeed] section."""
    from gpt.train.engine import check_deepspeed_section

    pattern = re.compile(r"--deepspeed\.[A-Za-z_.]+=[A-Za-z0-9_\"]+")
    texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    overrides = {m for text in texts for m in pattern.findall(text)}
    assert "--deepspeed.zero_optimization.stage=2" in overrides
    for arg in sorted(overrides):
        load_config(None, [arg, "--train.dtype=bf16"]).validate(1)
    for path in CONFIGS:
        check_deepspeed_section(load_config(path))


# -- train.global_batch_size: the batch on any number of processes --------------------------


@pytest.mark.parametrize("world, grad_accum", [(1, 64), (2, 32), (8, 8), (16, 4), (64, 1)])
def test_global_batch_size_derives_grad_accum_for_the_world_size(world, grad_accum):
    cfg = load_config(None, ["--train.global_batch_size=512", "--train.micro_batch_size=8"])
    cfg.validate(world)
    assert cfg.train.grad_accum == grad_accum and cfg.global_batch(world) == 512


@pytest.mark.parametrize("world, micro", [(16, 8), (8, 8), (7, 8), (1, 7)])
def test_a_global_batch_that_does_not_divide_is_refused_with_values_that_would(world, micro):
    args = ["--train.global_batch_size=480", f"--train.micro_batch_size={micro}"]
    with pytest.raises(ConfigError) as err:
        load_config(None, args).validate(world)
    message = str(err.value)
    assert message.startswith(f"train.global_batch_size = 480 but micro_batch_size ({micro})")
    suggested = message.split(f"these would work on {world} process(es): ")[1]
    micros = [int(b) for b in re.findall(r"(\d+) \(grad_accum \d+\)", suggested)]
    batches = re.search(r"global_batch_size = (\d+)(?: or (\d+))?$", suggested).groups()
    assert micros or 480 % world  # micro-batch sizes are offered where any would do
    for b in micros:
        cfg = load_config(None, ["--train.global_batch_size=480", f"--train.micro_batch_size={b}"])
        cfg.validate(world)
        assert cfg.global_batch(world) == 480 and b <= micro
    for g in [int(g) for g in batches if g]:
        cfg = load_config(
            None, [f"--train.global_batch_size={g}", f"--train.micro_batch_size={micro}"]
        )
        cfg.validate(world)
        assert cfg.global_batch(world) == g


def test_grad_accum_set_beside_a_global_batch_must_agree():
    args = ["--train.global_batch_size=64", "--train.micro_batch_size=8"]
    load_config(None, [*args, "--train.grad_accum=4"]).validate(2)  # 8 x 4 x 2 = 64
    with pytest.raises(ConfigError, match=r"= 64 but micro_batch_size \(8\) x grad_accum \(4\)"):
        load_config(None, [*args, "--train.grad_accum=4"]).validate(1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_without_a_global_batch_grad_accum_is_as_set(world):
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    cfg.validate(world)
    assert cfg.train.grad_accum == 1 and cfg.global_batch(world) == 16 * world


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.name.startswith("gpt2-")], ids=lambda p: p.name
)
@pytest.mark.parametrize("world", [1, 8, 16, 32])
def test_shipped_gpt2_configs_keep_their_global_batch_on_any_cluster(path, world):
    cfg = load_config(path)
    assert "train.grad_accum" not in cfg.given  # derived, so the batch cannot drift
    cfg.validate(world)
    assert cfg.global_batch(world) * cfg.model.block_size == 524_288


# -- data.extra_val: names that cannot stand for another set ----------------------------------


@pytest.mark.parametrize(
    "extra, name, message",
    [
        ('{val = "x"}', "", "data.extra_val.val: the name 'val' is reserved"),
        ('{train = "x"}', "", "data.extra_val.train: the name 'train' is reserved"),
        ('{replay = "x"}', "", "data.extra_val.replay: the name 'replay' is reserved"),
        ('{"" = "x"}', "", "the name must not be empty"),
        ('{domain = "x"}', "domain", "data.extra_val.domain: 'domain' is data.name"),
    ],
)
def test_reserved_extra_val_names_are_refused(extra, name, message):
    cfg = load_config(None, [f"--data.extra_val={extra}", f'--data.name="{name}"'])
    with pytest.raises(ConfigError, match=message):
        cfg.validate(1)


def test_a_saved_config_with_a_global_batch_resumes_on_another_world_size(tmp_path):
    """grad_accum derived from train.global_batch_size is not written to the run's
    config.toml: read back on another number of processes it is derived again."""
    cfg = load_config(None, ["--train.global_batch_size=32", "--train.micro_batch_size=4"])
    cfg.validate(2)
    assert cfg.train.grad_accum == 4
    save_config(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    again.validate(4)
    assert again.train.grad_accum == 2 and again.global_batch(4) == 32


def test_an_out_dir_that_is_or_lies_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, why in [("file", "is a file"), ("file/run", "lies below the file")]:
        cfg = load_config(None, [f"--train.out_dir={tmp_path / out}"])
        with pytest.raises(ConfigError, match=rf"train.out_dir = .*{out}' {why}"):
            cfg.validate(1)


def test_a_boolean_loss_scale_is_refused():
    cfg = load_config(None, ["--train.dtype=fp16", "--deepspeed.fp16.loss_scale=false"])
    with pytest.raises(ConfigError, match="loss_scale"):
        cfg.validate(1)


def test_a_run_saved_with_the_retired_bench_table_resumes(tmp_path, data_dir):
    """Runs started before bench/trainer.py saved a [bench] table (steps = 0) in config.toml,
    and users' configs copied from them hold it too: the run reads, resumes from its
    checkpoint and writes its config.toml again without the table."""
    from runs import config, losses

    from gpt.cli import train
    from gpt.run import read_run

    path, out = config(tmp_path, data_dir)
    assert train.main([str(path), "--train.max_steps=5"]) == 0  # a checkpoint at step 5
    old_bench = "[bench]\nsteps = 0\nwarmup = 3\nbackends = []\ncompile = [false, true]\n"
    for toml in (path, out / "config.toml"):
        toml.write_text(toml.read_text() + old_bench)
    assert read_run(out).config == load_config(path, ["--train.max_steps=5"])
    assert train.main([str(path), "--train.max_steps=7"]) == 0
    assert sorted(losses(out)) == list(range(1, 8))
    assert "[bench]" not in (out / "config.toml").read_text()
