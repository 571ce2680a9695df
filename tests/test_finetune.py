"""Fine-tuning: init_from loads weights exactly with a fresh optimizer; a contradicting [model]
key is refused; freezing keeps frozen weights bitwise; LoRA trains adapters only, saves them
alone, and merges into a plain model equal to the adapted one (and loadable by transformers);
replay training resumes exactly; step 0 is evaluated. (LoRA layers: test_lora.py; the replay
mix: test_data_replay.py.)"""

import json

import pytest
import torch
import transformers
from runs import config, copy_run_at, losses, records, torchrun
from safetensors.torch import load_file

from gpt.cli import train
from gpt.config import Config, ConfigError, FinetuneConfig, ModelConfig
from gpt.data.loader import TokenLoader
from gpt.data.prepare import prepare
from gpt.lora import add_lora
from gpt.model import GPT
from gpt.store import latest_checkpoint, load_model

transformers.logging.set_verbosity_error()

FINETUNE = """
[data]
dir = "{domain}"
name = "domain"
extra_val = {{general = "{general}"}}
[train]
out_dir = "{out}"
init_from = "{base}"
max_steps = 6
micro_batch_size = 4
grad_accum = 2
eval_interval = 3
eval_steps = 2
ckpt_interval = 3
log_interval = 1
seed = 11
wandb = false
sample_tokens = 0
[optim]
lr = 3e-3
min_lr = 3e-4
warmup_steps = 2
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """A base model pretrained on the general corpus (10 steps of the tiny config)."""
    tmp = tmp_path_factory.mktemp("base")
    path, out = config(tmp, data_dir, "base")
    assert train.main([str(path), "--train.eval_interval=0"]) == 0
    return out


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A small 'domain' corpus unlike the general one: code-like text."""
    root = tmp_path_factory.mktemp("domain")
    docs = root / "docs"
    docs.mkdir()
    for i in range(12):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)]
        (docs / f"m{i}.py").write_text("".join(lines))
    prepare([str(docs)], root / "data", encoding="bytes", val_fraction=0.25, progress=False)
    return root / "data"


def finetune_config(tmp_path, name, base, domain, general, **finetune):
    text = FINETUNE.format(domain=domain, general=general, out=tmp_path / name, base=base)
    if finetune:
        text += "[finetune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in finetune.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path, tmp_path / name


def first_batch_loss(model: GPT, domain, seed=11) -> float:
    loader = TokenLoader(domain, "train", 16, 4, seed=seed)
    with torch.no_grad():
        a = model(*loader.next_batch())[1].item()
        b = model(*loader.next_batch())[1].item()
    return (a + b) / 2


def params(path) -> dict[str, torch.Tensor]:
    return dict(load_model(path).state_dict())


def test_init_from_loads_the_weights_exactly_with_a_fresh_optimizer(
    tmp_path, base, domain, data_dir
):
    path, out = finetune_config(tmp_path, "full", base, domain, data_dir)
    assert train.main([str(path)]) == 0
    logged = records(out)
    start = logged[0]
    assert start["step"] == 0 and "loss" not in start  # evaluated before any update
    assert {"val_loss", "val_loss/domain", "val_loss/general"} <= start.keys()
    assert start["val_loss"] == start["val_loss/domain"]
    base_model = GPT.from_pretrained(latest_checkpoint(base) / "model").eval()
    # the first step's loss is the base model's loss on the fine-tuning run's first batch
    assert logged[1]["step"] == 1 and logged[1]["loss"] == first_batch_loss(base_model, domain)
    assert logged[1]["lr"] == pytest.approx(3e-3 / 2)  # its own schedule, from step 0
    state = torch.load(  # our own run's DeepSpeed file: trusted
        latest_checkpoint(out) / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False
    )
    steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert steps == {6}  # a fresh AdamW: 6 updates here, none carried over from the base
    trainer_state = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert trainer_state["step"] == 6 and trainer_state["loader"]["position"] == 6 * 8


def test_a_contradicting_model_key_is_refused_with_the_fields_named(
    tmp_path, base, domain, data_dir, capsys
):
    path, out = finetune_config(tmp_path, "bad", base, domain, data_dir)
    args = [str(path), "--model.n_layer=4", "--model.n_embd=64", "--model.dropout=0.1"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "model.n_layer = 4 (the checkpoint has 2)" in err
    assert "model.n_embd = 64 (the checkpoint has 32)" in err
    assert "dropout" not in err.split("the config sets")[1].split(". Remove")[0]
    assert not out.exists()
    # keys equal to the checkpoint's, and those that change no weight, are fine
    ok = [str(path), "--model.n_layer=2", "--model.attention=naive", "--train.max_steps=1"]
    assert train.main([*ok, "--model.dropout=0.1", "--train.eval_interval=0"]) == 0
    compute = ["--model.loss_chunk=8", '--model.sdpa_kernels=["math"]', "--model.attention=sdpa"]
    args = [str(path), "--train.max_steps=2", "--train.eval_interval=0", *compute]
    assert train.main(args) == 0
    saved = json.loads((latest_checkpoint(out) / "model" / "config.json").read_text())
    assert saved["gpt_config"]["loss_chunk"] == 8
    assert saved["gpt_config"]["sdpa_kernels"] == ["math"]


def test_frozen_embeddings_and_blocks_stay_bitwise_unchanged(tmp_path, base, domain, data_dir):
    path, out = finetune_config(
        tmp_path, "frozen", base, domain, data_dir, freeze_embeddings=True, freeze_blocks=1
    )
    assert train.main([str(path)]) == 0
    before, after = params(base), params(out)
    frozen = [
        k
        for k in before
        if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))
    ]
    trained = [k for k in before if k.startswith(("transformer.h.1.", "transformer.ln_f"))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_lora_trains_adapters_only_and_merges_into_an_equal_plain_model(
    tmp_path, base, domain, data_dir
):
    path, out = finetune_config(
        tmp_path, "lora", base, domain, data_dir, lora_rank=4, lora_alpha=8.0,
        lora_targets=["attn.c_attn", "mlp.c_fc"],
    )  # fmt: skip
    assert train.main([str(path)]) == 0
    ckpt = latest_checkpoint(out)
    assert not (ckpt / "model").exists()  # adapters only, not another copy of the base
    adapters = load_file(ckpt / "adapters" / "adapters.safetensors")
    assert sorted(adapters) == sorted(
        f"transformer.h.{i}.{layer}.lora_{m}"
        for i in range(2)
        for layer in ("attn.c_attn", "mlp.c_fc")
        for m in "AB"
    )
    ds_state = torch.load(ckpt / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(ds_state["module"]) == set(adapters)  # the frozen base is not saved again
    # the adapted model (base + adapters, unmerged) against the merged plain model
    base_model = GPT.from_pretrained(latest_checkpoint(base) / "model")
    adapted = add_lora(GPT.from_pretrained(latest_checkpoint(base) / "model"), 4, 8.0, 0.0,
                       ["attn.c_attn", "mlp.c_fc"])  # fmt: skip
    adapted.load_state_dict(adapters, strict=False)
    merged = load_model(out).eval()
    idx = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted.eval()(idx), rtol=0, atol=1e-5)
        assert (merged(idx) - base_model.eval()(idx)).abs().max() > 1e-3  # it did learn
    # only the adapted projections changed; everything else is the base's, bitwise
    for name, tensor in base_model.state_dict().items():
        changed = not torch.equal(tensor, merged.state_dict()[name])
        assert changed == name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")), name
    # the merged model exports to a plain Hugging Face model with the same logits
    from gpt.cli import sample
    from gpt.convert.__main__ import main as convert

    sample.main(["--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "3", "--seed", "1"])

    assert convert([str(out), str(tmp_path / "hf")]) == 0  # python -m gpt.convert RUN OUT
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, merged(idx), rtol=0, atol=1e-5)


def test_replay_training_resumes_exactly(tmp_path, base, domain, data_dir):
    replay = dict(replay_dir=str(data_dir), replay_fraction=0.25)
    path_a, out_a = finetune_config(tmp_path, "straight", base, domain, data_dir, **replay)
    assert train.main([str(path_a)]) == 0
    path_b, out_b = finetune_config(tmp_path, "resumed", base, domain, data_dir, **replay)
    copy_run_at(out_a, out_b, 3)
    assert train.main([str(path_b)]) == 0
    assert losses(out_a) == losses(out_b) and len(losses(out_a)) == 6
    assert [r["step"] for r in records(out_b)] == list(range(7))  # step 0 once, no repeats
    state = json.loads((latest_checkpoint(out_b) / "trainer.json").read_text())["loader"]
    assert state["position"] == 48 and state["fraction"] == "1/4"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_lora_under_zero_on_two_processes_matches_one(tmp_path, base, domain, data_dir, stage):
    lora = dict(lora_rank=4, lora_alpha=8.0)
    path_1, out_1 = finetune_config(tmp_path, "one", base, domain, data_dir, **lora)
    assert train.main([str(path_1)]) == 0
    path_2, out_2 = finetune_config(tmp_path, "two", base, domain, data_dir, **lora)
    torchrun(path_2, "--train.micro_batch_size=2", f"--deepspeed.zero_optimization.stage={stage}")
    one, two = losses(out_1), losses(out_2)
    assert one.keys() == two.keys() and len(one) == 6
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    a = load_file(latest_checkpoint(out_1) / "adapters" / "adapters.safetensors")
    b = load_file(latest_checkpoint(out_2) / "adapters" / "adapters.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_an_interrupted_lora_run_resumes_exactly(tmp_path, base, domain, data_dir):
    """Resuming loads the adapters and their optimizer state over a freshly loaded base."""
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    path_a, out_a = finetune_config(tmp_path, "straight", base, domain, data_dir, **lora)
    assert train.main([str(path_a)]) == 0
    path_b, out_b = finetune_config(tmp_path, "resumed", base, domain, data_dir, **lora)
    copy_run_at(out_a, out_b, 3)
    assert train.main([str(path_b)]) == 0
    assert losses(out_a) == losses(out_b)
    a = load_file(latest_checkpoint(out_a) / "adapters" / "adapters.safetensors")
    b = load_file(latest_checkpoint(out_b) / "adapters" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- what LoRA and freezing may be asked for, given the model's shape -------------------------

SHAPES = [
    dict(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=32),
    dict(vocab_size=257, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=1),
    dict(vocab_size=257, block_size=16, n_layer=3, n_head=2, n_embd=48, mlp_hidden_dim=20),
    dict(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, mlp="swiglu"),
]
TARGET_SETS = [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj", "mlp.c_fc"]]


def adapting(tmp_path, shape: dict, **finetune) -> Config:
    """A validated-looking fine-tuning config: init_from must exist; the model's shape is the
    checkpoint's (set here directly, as train.py's main() does)."""
    cfg = Config(model=ModelConfig(**shape), finetune=FinetuneConfig(**finetune))
    cfg.train.init_from = str(tmp_path)
    return cfg


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("targets", TARGET_SETS, ids=str)
def test_lora_rank_is_bounded_by_the_smallest_targeted_layer(tmp_path, shape, targets):
    """The bound is min(in, out) over the layers LoRA would wrap in the built model: that
    rank is accepted, one more is refused naming the bound."""
    model = add_lora(GPT(ModelConfig(**shape)), 1, 1.0, 0.0, targets)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    bound = min(min(m.in_features, m.out_features) for m in layers)
    adapting(tmp_path, shape, lora_rank=bound, lora_targets=targets).validate(1)
    with pytest.raises(ConfigError) as err:
        adapting(tmp_path, shape, lora_rank=bound + 1, lora_targets=targets).validate(1)
    message = str(err.value)
    assert message.startswith(f"finetune.lora_rank = {bound + 1} is larger than the targeted")
    assert message.endswith(f"use finetune.lora_rank <= {bound}")


def test_lora_with_every_block_frozen_is_refused(tmp_path):
    shape = SHAPES[0]
    adapting(tmp_path, shape, lora_rank=4, freeze_blocks=1).validate(1)  # block 1 trains
    with pytest.raises(ConfigError) as err:
        adapting(tmp_path, shape, lora_rank=4, freeze_blocks=2).validate(1)
    message = str(err.value)
    assert "finetune.lora_rank = 4 with finetune.freeze_blocks = 2 (every block)" in message
    assert "leaves nothing to train" in message and "set finetune.freeze_blocks below 2" in message


def test_freezing_everything_is_refused(tmp_path):
    """A pre-norm model keeps its final norm trainable; a post-norm model with a tied head has
    nothing left once the embeddings and every block are frozen."""
    frozen = dict(freeze_embeddings=True, freeze_blocks=2)
    adapting(tmp_path, SHAPES[0], **frozen).validate(1)
    post = {**SHAPES[0], "norm_position": "post"}
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        adapting(tmp_path, post, **frozen).validate(1)
    adapting(tmp_path, {**post, "tie_embeddings": False}, **frozen).validate(1)  # head trains
    with pytest.raises(ConfigError, match="finetune.freeze_blocks = 3, but the model has 2"):
        adapting(tmp_path, SHAPES[0], freeze_blocks=3).validate(1)


@pytest.mark.parametrize(
    "finetune, message",
    [
        (dict(lora_rank=1000), "larger than the targeted layers"),
        (dict(lora_rank=1000), "use finetune.lora_rank <= 32"),
        (dict(lora_rank=4, freeze_blocks=2), "leaves nothing to train"),
        (dict(lora_rank=4, freeze_blocks=2), "set finetune.freeze_blocks below 2"),
    ],
)
def test_train_refuses_lora_it_cannot_train(
    tmp_path, base, domain, data_dir, capsys, finetune, message
):
    """Before any model is built (status 2), against the checkpoint's shape (n_embd 32,
    2 blocks)."""
    path, out = finetune_config(tmp_path, "lora", base, domain, data_dir, **finetune)
    assert train.main([str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_rotary_base_fine_tunes_at_a_longer_context_with_rope_scaling(tmp_path, data_dir, capsys):
    """Context extension (docs/long-context.md): train.init_from a rotary model with a larger
    block_size and a model.rope_scaling. The weights are the base's; a learned-position base
    refuses a new block_size (its position table is weights)."""
    from gpt.config_io import load_config
    from gpt.train.finetune import build_model, init_model_config

    base_path, base = config(tmp_path, data_dir, "base")
    rope = ["--model.position_encoding=rope", "--train.eval_interval=0"]
    assert train.main([str(base_path), *rope, "--train.max_steps=2"]) == 0
    path, out = config(tmp_path, data_dir, "long")
    scaling = "{type = 'yarn', factor = 4, original_max_position_embeddings = 16}"
    args = [str(path), f"--train.init_from={base}", "--model.block_size=48", "--train.max_steps=1"]
    args += ["--train.eval_interval=0", f"--model.rope_scaling={scaling}"]
    cfg = load_config(path, args[1:])
    cfg.model = init_model_config(cfg)
    assert cfg.model.block_size == 48 and cfg.model.rope_scaling["type"] == "yarn"
    extended, original = build_model(cfg), load_model(base)
    for (name, a), b in zip(
        extended.state_dict().items(), original.state_dict().values(), strict=True
    ):
        if not name.startswith("rope_"):  # the rotary tables are computed, not trained
            assert torch.equal(a, b), name
    assert train.main(args) == 0
    saved = json.loads((latest_checkpoint(out) / "model" / "config.json").read_text())
    assert saved["gpt_config"]["block_size"] == 48
    assert saved["gpt_config"]["rope_scaling"]["factor"] == 4
    learned_path, learned = config(tmp_path, data_dir, "learned")
    assert train.main([str(learned_path), "--train.max_steps=1", "--train.eval_interval=0"]) == 0
    path, _ = config(tmp_path, data_dir, "learned-long")
    assert train.main([str(path), f"--train.init_from={learned}", "--model.block_size=48"]) == 2
    assert "model.block_size = 48 (the checkpoint has 16)" in capsys.readouterr().err
