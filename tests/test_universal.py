"""gpt/train/universal.py in one process: the universal state written by an engine at ZeRO 0
or 1 loads into a fresh engine at either stage with the weights, both Adam moments, Adam's
step and the engine's counters exact, and training continues as if never interrupted;
index.json and its safetensors are checked, every error naming the file. (Other world sizes
and ZeRO 2-3 run under torchrun in test_cluster.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file

from gpt.config import Config, ModelConfig
from gpt.model import GPT
from gpt.train.universal import (
    UniversalStateError,
    has_universal,
    load_universal,
    read_index,
    save_universal,
    supported,
)

MODEL = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
STAGES = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """The process group every DeepSpeed engine needs: a world of one (gloo on the CPU), as
    a plain ``python train.py`` starts it."""
    from gpt.train.engine import init_distributed

    init_distributed()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MODEL.vocab_size, (2, MODEL.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def engine_at(stage: int, seed: int, steps: int):
    """(engine, optimizer) at ZeRO ``stage`` for a model initialised from ``seed``, after
    ``steps`` optimizer steps on batches 0, 1, ..."""
    from gpt.train.engine import build_engine

    cfg = Config(model=MODEL)
    cfg.train.dtype, cfg.train.micro_batch_size, cfg.train.grad_accum = "fp32", 2, 1
    cfg.train.compile = False
    cfg.deepspeed = {"zero_optimization": {"stage": stage}}
    torch.manual_seed(seed)
    engine, optimizer = build_engine(GPT(MODEL), cfg, 1)
    assert supported(engine, optimizer)
    for i in range(steps):
        step(engine, i)
    return engine, optimizer


def step(engine, i: int) -> None:
    _, loss = engine(*batch(i))
    engine.backward(loss)
    engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def saved(root) -> dict[str, torch.Tensor]:
    """Every tensor of root/universal/, by "{name}/{kind}"."""
    tensors = {}
    for part in sorted((root / "universal").glob("*.safetensors")):
        tensors.update(load_file(part))
    return tensors


def close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Equal up to the rounding of another summation order, relative to the tensor's scale:
    Adam turns the rounding noise of a near-zero gradient (the key bias has none, exactly)
    into a full-size update, so element-wise relative tolerances do not apply."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale, msg=msg)


def test_zero0_saves_the_optimizers_own_state_exactly(tmp_path):
    engine, optimizer = engine_at(0, seed=1, steps=3)
    save_universal(engine, optimizer, tmp_path)
    assert has_universal(tmp_path)
    index, tensors = read_index(tmp_path), saved(tmp_path)
    names = [n for n, _ in engine.module.named_parameters()]
    assert list(index["params"]) == names
    assert index["adam_step"] == 3 and index["world_size"] == 1 and index["zero_stage"] == 0
    assert index["engine"]["global_steps"] == 3 and index["engine"]["global_samples"] == 6
    assert set(tensors) == {f"{n}/{k}" for n in names for k in ("fp32", "exp_avg", "exp_avg_sq")}
    for name, p in engine.module.named_parameters():
        assert index["params"][name]["shape"] == list(p.shape)
        assert torch.equal(tensors[f"{name}/fp32"], p.detach()), name
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(tensors[f"{name}/{kind}"], optimizer.state[p][kind]), (name, kind)


def test_zero1_saves_the_same_state_as_zero0(tmp_path):
    """The same training at ZeRO 1 (DeepSpeed's flat, partitioned fp32 masters and moments)
    saves what ZeRO 0 saves, up to float32 rounding of its other summation order."""
    for stage in (0, 1):
        engine, optimizer = engine_at(stage, seed=1, steps=3)
        save_universal(engine, optimizer, tmp_path / str(stage))
    zero0, zero1 = saved(tmp_path / "0"), saved(tmp_path / "1")
    assert zero0.keys() == zero1.keys()
    for key, tensor in zero0.items():
        close(zero1[key], tensor, key)
        assert tensor.abs().sum() > 0, key  # after 3 steps no moment is all zeros
    assert read_index(tmp_path / "1")["adam_step"] == 3


@pytest.mark.parametrize("saved_at, loaded_at", STAGES, ids=lambda s: f"zero{s}")
def test_state_loads_exactly_into_a_fresh_engine_and_training_continues(
    tmp_path, saved_at, loaded_at
):
    """A (seed 1, 3 steps) saved; B (seed 2, 1 step: other weights, moments and counters)
    loads it and must then hold A's state exactly, saved again bit for bit; one more step
    on both gives the same weights (exactly at the same stage)."""
    a, a_opt = engine_at(saved_at, seed=1, steps=3)
    save_universal(a, a_opt, tmp_path / "a")
    b, b_opt = engine_at(loaded_at, seed=2, steps=1)
    load_universal(b, b_opt, tmp_path / "a")
    for name, tensor in weights(a).items():
        assert torch.equal(weights(b)[name], tensor), name
    assert (b.global_steps, b.global_samples) == (3, 6)
    save_universal(b, b_opt, tmp_path / "b")
    expected, got = saved(tmp_path / "a"), saved(tmp_path / "b")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert read_index(tmp_path / "b")["adam_step"] == 3
    step(a, 3)
    step(b, 3)
    for name, tensor in weights(a).items():
        if saved_at == loaded_at:
            assert torch.equal(weights(b)[name], tensor), name
        else:
            close(weights(b)[name], tensor, name)


def test_a_model_with_other_parameters_is_refused_naming_the_index(tmp_path):
    a, a_opt = engine_at(0, seed=1, steps=1)
    save_universal(a, a_opt, tmp_path)
    index_file = tmp_path / "universal" / "index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["params"]))
    index["params"]["extra.weight"] = index["params"].pop(name)
    index_file.write_text(json.dumps(index))
    b, b_opt = engine_at(0, seed=2, steps=0)
    with pytest.raises(
        UniversalStateError, match=rf"^{index_file}: parameters do not match"
    ) as err:
        load_universal(b, b_opt, tmp_path)
    assert f"missing ['{name}'], unexpected ['extra.weight']" in str(err.value)


def test_a_missing_or_wrongly_shaped_tensor_file_is_named(tmp_path):
    a, a_opt = engine_at(0, seed=1, steps=1)
    save_universal(a, a_opt, tmp_path)
    part = tmp_path / "universal" / "rank00000.safetensors"
    b, b_opt = engine_at(0, seed=2, steps=0)
    tensors = load_file(part)
    name = next(iter(read_index(tmp_path)["params"]))
    from safetensors.torch import save_file

    save_file({**tensors, f"{name}/exp_avg": torch.zeros(3)}, part)
    with pytest.raises(UniversalStateError, match=rf"^{part}: {name} has shape"):
        load_universal(b, b_opt, tmp_path)
    part.write_bytes(b"not safetensors")
    with pytest.raises(UniversalStateError, match=rf"^{part}: cannot read"):
        load_universal(b, b_opt, tmp_path)
    part.unlink()
    with pytest.raises(UniversalStateError, match=rf"^{part}: cannot read"):
        load_universal(b, b_opt, tmp_path)


GOOD_INDEX = {
    "format": 1,
    "world_size": 1,
    "zero_stage": 0,
    "adam_step": 20,
    "engine": {"global_steps": 20, "global_samples": 160, "skipped_steps": 0},
    "loss_scaler": {"cur_scale": 65536.0},
    "params": {"w": {"file": "rank00000.safetensors", "shape": [2]}},
}


def first(index):
    return next(iter(index["params"].values()))


DAMAGED = [
    (lambda i: first(i).pop("file"), "damaged: params.w.file must name a .safetensors"),
    (lambda i: first(i).update(file="../x.safetensors"), "a .safetensors file beside it"),
    (lambda i: first(i).update(file="/tmp/x.safetensors"), "a .safetensors file beside it"),
    (lambda i: first(i).update(file="rank00000.pt"), "must name a .safetensors"),
    (lambda i: i["params"].update(w="rank00000.safetensors"), "must name a .safetensors"),
    (lambda i: i.update(params=[]), "damaged: params must be an object"),
    (lambda i: i.pop("params"), "damaged: params must be an object"),
    (lambda i: i.update(adam_step="20"), "damaged: adam_step must be an integer >= 0"),
    (lambda i: i.update(adam_step=-1), "damaged: adam_step must be an integer >= 0"),
    (lambda i: i.update(adam_step=True), "damaged: adam_step must be an integer >= 0"),
    (lambda i: i.update(adam_step=2.0), "damaged: adam_step must be an integer >= 0"),
    (lambda i: i.update(engine={"global_steps": "x"}), "damaged: engine must map names to num"),
    (lambda i: i.update(engine=[1]), "damaged: engine must map names to numbers"),
    (lambda i: i.update(loss_scaler={"cur_scale": True}), "damaged: loss_scaler must map"),
    (lambda i: i.update(format=2), "not a universal state of format 1"),
    (lambda i: i.pop("format"), "not a universal state of format 1"),
]


@pytest.mark.parametrize("damage, message", DAMAGED)
def test_a_damaged_index_is_refused_naming_the_file(tmp_path, damage, message):
    index_file = tmp_path / "universal" / "index.json"
    index_file.parent.mkdir()
    index_file.write_text(json.dumps(GOOD_INDEX))
    assert read_index(tmp_path) == GOOD_INDEX
    index = json.loads(json.dumps(GOOD_INDEX))
    damage(index)
    index_file.write_text(json.dumps(index))
    with pytest.raises(UniversalStateError) as err:
        read_index(tmp_path)
    assert str(err.value).startswith(f"{index_file}: ") and message in str(err.value)


@pytest.mark.parametrize("content", [None, "{not json", b"\xff\xfe", "[1, 2]", '"text"'], ids=str)
def test_an_unreadable_index_is_refused_naming_the_file(tmp_path, content):
    index_file = tmp_path / "universal" / "index.json"
    index_file.parent.mkdir()
    if isinstance(content, bytes):
        index_file.write_bytes(content)
    elif content is not None:
        index_file.write_text(content)
    assert has_universal(tmp_path) == (content is not None)
    with pytest.raises(UniversalStateError, match=rf"^{index_file}: (unreadable|not a universal)"):
        read_index(tmp_path)
