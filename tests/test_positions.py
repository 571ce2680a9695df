"""Validation loss by position (gpt/eval/positions.py): the batched per-position loss against
a float64 reference computed one prefix at a time, hand-worked buckets, the CLI's table,
JSON and plot, and its refusals naming the flag."""

import dataclasses
import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from figures import drawn

from gpt import GPT, ModelConfig
from gpt.data.loader import TokenLoader
from gpt.eval import positions
from gpt.eval.positions import bucket_edges, bucket_means, loss_by_position

PROG = "python -m gpt.eval.positions"


def run(capsys, *argv):
    try:
        code = positions.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
@pytest.mark.parametrize("length, windows, batch", [(8, 3, 2), (32, 5, 4), (17, 2, 8)])
def test_loss_by_position_equals_a_prefix_by_prefix_reference_in_float64(
    data_dir, position_encoding, length, windows, batch
):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=16,
                      position_encoding=position_encoding)  # fmt: skip
    model = GPT(cfg).double().eval()
    loader = TokenLoader(data_dir, "val", length, 1, mode="sequential")
    got = loss_by_position(model, loader, windows, batch)
    assert got.dtype == torch.float64 and got.shape == (length,)
    # reference: each target alone, from its own prefix (no batching, no causal mask needed)
    ref = np.zeros(length)
    for w in range(windows):
        seq = torch.from_numpy(loader.sequences(np.array([w]))[0])  # (T + 1,)
        for t in range(length):
            with torch.no_grad():
                logits = model(seq[None, : t + 1])[0, -1]
            ref[t] -= torch.log_softmax(logits, -1)[seq[t + 1]].item() / windows
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "length, width, edges",
    [
        (10, None, [0, 1, 2, 4, 8, 10]),
        (8, None, [0, 1, 2, 4, 8]),
        (9, None, [0, 1, 2, 4, 8, 9]),
        (1, None, [0, 1]),
        (2, None, [0, 1, 2]),
        (10, 4, [0, 4, 8, 10]),
        (10, 5, [0, 5, 10]),
        (10, 20, [0, 10]),
    ],
)
def test_bucket_edges(length, width, edges):
    assert bucket_edges(length, width) == edges


def test_bucket_means_by_hand():
    values = [4.0, 2.0, 1.0, 3.0, 5.0, 7.0, 0.0]
    assert bucket_means(values, [0, 1, 2, 4, 7]) == [4.0, 2.0, 2.0, 4.0]


def test_cli_writes_table_json_and_plot(capsys, model_dir, data_dir, tmp_path, saved_figures):
    out = tmp_path / "pos.json"
    code, stdout, err = run(capsys, "--ckpt", model_dir, "--data", data_dir, "--windows", 3,
                            "--out", out)  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    per = result["per_position"]
    assert len(per) == 32 and result["config"]["windows"] == 3
    assert result["config"]["length"] == 32 == result["config"]["block_size"]
    edges = [0, 1, 2, 4, 8, 16, 32]
    assert [(b["start"], b["end"]) for b in result["buckets"]] == list(pairwise(edges))
    for b in result["buckets"]:
        assert b["loss"] == pytest.approx(np.mean(per[b["start"] : b["end"]]), rel=1e-12)
        assert b["tokens"] == 3 * (b["end"] - b["start"])
    assert result["mean"] == pytest.approx(np.mean(per))
    assert "[16, 32)" in stdout and f"{result['buckets'][-1]['loss']:.4f}" in stdout
    # the plot beside --out: the per-position curve and the bucket means at bucket middles
    (fig,) = saved_figures
    lines = drawn(fig.axes[0])["lines"]
    (label, xs, ys), (label2, xs2, ys2) = lines
    assert label.endswith("per position") and xs == list(range(32))
    np.testing.assert_allclose(ys, per)
    assert label2.endswith("bucket mean")
    assert xs2 == [(a + b - 1) / 2 for a, b in pairwise(edges)]
    np.testing.assert_allclose(ys2, [b["loss"] for b in result["buckets"]])
    assert "position" in fig.axes[0].get_xlabel() and "loss" in fig.axes[0].get_ylabel()


def test_cli_compare_overlays_earlier_results(capsys, model_dir, data_dir, tmp_path,
                                               saved_figures):  # fmt: skip
    first = tmp_path / "a.json"
    assert run(capsys, "--ckpt", model_dir, "--data", data_dir, "--windows", 2, "--length", 16,
               "--bucket-width", 4, "--label", "A", "--out", first)[0] == 0  # fmt: skip
    png = tmp_path / "b.png"
    code, _, err = run(capsys, "--ckpt", model_dir, "--data", data_dir, "--windows", 2,
                       "--label", "B", "--compare", first, "--plot", png)  # fmt: skip
    assert code == 0, err
    legend = drawn(saved_figures[-1].axes[0])["legend"]
    assert legend == ["A, per position", "A, bucket mean", "B, per position", "B, bucket mean"]
    a_buckets = json.loads(first.read_text())["buckets"]
    assert [(b["start"], b["end"]) for b in a_buckets] == [(0, 4), (4, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize(
    "args, said",
    [
        (["--length", 64], "--length 64: the model cannot run it: sequence length 64 exceeds "
                           "block_size 32"),
        (["--length", 0], "--length must be >= 1, got 0"),
        (["--windows", 0], "--windows must be >= 1, got 0"),
        (["--bucket-width", 0], "--bucket-width must be >= 1, got 0"),
        (["--compare", "nope.json"], "--compare nope.json: no such file"),
    ],
)  # fmt: skip
def test_refusals_name_the_flag(capsys, model_dir, data_dir, args, said):
    code, out, err = run(capsys, "--ckpt", model_dir, "--data", data_dir, *args)
    assert code == 2 and said in err


def test_data_is_needed_for_a_model_directory(capsys, model_dir):
    code, _, err = run(capsys, "--ckpt", model_dir)
    assert code == 2 and "give --data" in err


def test_a_split_shorter_than_the_length_names_it(capsys, data_dir, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, block_size=8192, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "long", tokenizer="bytes")
    code, _, err = run(capsys, "--ckpt", tmp_path / "long", "--data", data_dir, "--length", 8000)
    assert code == 2 and "--length 8000:" in err and "split 'val' has" in err


def test_data_of_another_encoding_is_refused(capsys, data_dir, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=8))
    model.save_pretrained(tmp_path / "bpe", tokenizer="gpt2")
    code, _, err = run(capsys, "--ckpt", tmp_path / "bpe", "--data", data_dir)
    assert code == 2
    assert f"--data {data_dir}: encoded with 'bytes', the model's tokenizer is 'gpt2'" in err


def test_past_block_size_when_rope_scaling_runs_it(capsys, data_dir, tmp_path):
    """block_size 16 with a yarn factor of 2 runs 32 positions: --length 32 is measured,
    --length 33 is the model's refusal, naming the positions of model.rope_scaling."""
    torch.manual_seed(0)
    scaling = {"type": "yarn", "factor": 2, "original_max_position_embeddings": 16}
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      position_encoding="rope", rope_scaling=scaling)  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "yarn", tokenizer="bytes")
    out = tmp_path / "yarn.json"
    code, _, err = run(capsys, "--ckpt", tmp_path / "yarn", "--data", data_dir, "--length", 32,
                       "--windows", 2, "--out", out)  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    assert len(result["per_position"]) == 32 and result["config"]["max_positions"] == 32
    code, _, err = run(capsys, "--ckpt", tmp_path / "yarn", "--data", data_dir, "--length", 33)
    assert code == 2 and "--length 33: the model cannot run it" in err
    assert "the 32 positions of model.rope_scaling" in err


def test_context_flags_run_a_rotary_model_zero_shot_as_if_trained_so(capsys, data_dir, tmp_path):
    """--rope-scaling and --block-size give what a model saved with those keys gives: the
    same weights, the context of the flags, the keys recorded in --out."""
    torch.manual_seed(0)
    base = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                       position_encoding="rope")  # fmt: skip
    model = GPT(base)
    model.save_pretrained(tmp_path / "base", tokenizer="bytes")
    scaling = {"type": "yarn", "factor": 2, "original_max_position_embeddings": 16}
    for name, keys in [("yarn", {"rope_scaling": scaling}), ("long", {"block_size": 32})]:
        trained = GPT(dataclasses.replace(base, **keys))
        trained.load_state_dict(model.state_dict())
        trained.save_pretrained(tmp_path / name, tokenizer="bytes")
    common = ("--data", data_dir, "--length", 32, "--windows", 2)
    flags = {"yarn": ["--rope-scaling", '{type = "yarn", factor = 2, '
                      "original_max_position_embeddings = 16}"],
             "long": ["--block-size", 32]}  # fmt: skip
    for name, extra in flags.items():
        results = []
        for ckpt, more in ((tmp_path / name, []), (tmp_path / "base", extra)):
            out = tmp_path / f"{name}-{len(more)}.json"
            code, _, err = run(capsys, "--ckpt", ckpt, *common, *more, "--out", out)
            assert code == 0, err
            results.append(json.loads(out.read_text()))
        assert results[0]["per_position"] == results[1]["per_position"]
        configs = [{k: v for k, v in r["config"].items() if k != "ckpt"} for r in results]
        assert configs[0] == configs[1]
    assert results[1]["config"]["block_size"] == 32
    # without the flags the base runs 16 positions only
    code, _, err = run(capsys, "--ckpt", tmp_path / "base", *common)
    assert code == 2 and "--length 32: the model cannot run it" in err


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--rope-scaling", "{type = 'yarn'"], "--rope-scaling \"{type = 'yarn'\" is not TOML"),
        (["--rope-scaling", "4"], "--rope-scaling '4': a TOML inline table"),
        (["--rope-scaling", "{type = 'ntk', factor = 2, original_max_position_embeddings = 16}"],
         "--rope-scaling: model.rope_scaling.type = 'ntk' is not valid"),
        (["--block-size", 0], "--block-size: model.block_size"),
    ],
)  # fmt: skip
def test_context_flag_refusals_name_the_flag(capsys, data_dir, tmp_path, flags, said):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      position_encoding="rope")  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "m", tokenizer="bytes")
    code, out, err = run(capsys, "--ckpt", tmp_path / "m", "--data", data_dir, *flags)
    assert code == 2 and said in err, err


def test_context_flags_refuse_learned_positions(capsys, model_dir, data_dir):
    code, _, err = run(capsys, "--ckpt", model_dir, "--data", data_dir, "--block-size", 64)
    assert code == 2
    assert "--block-size: the model in" in err and "position_encoding 'learned'" in err


def test_compare_refuses_a_file_of_another_kind(capsys, model_dir, data_dir, tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"results": []}')
    code, _, err = run(capsys, "--ckpt", model_dir, "--data", data_dir, "--compare", other)
    assert code == 2 and f"--compare {other}: not a {PROG} --out file" in err


@pytest.mark.parametrize("which", ["run", "checkpoint"])
def test_data_defaults_to_the_runs_own(capsys, twenty, data_dir, which):
    ckpt = twenty if which == "run" else twenty / "checkpoints" / "step_00000010"
    code, out, err = run(capsys, "--ckpt", ckpt, "--windows", 2)
    assert code == 0, err
    assert out.splitlines()[-1].endswith(f"windows of {data_dir}")


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--block-size", 10**12], "--block-size: model.block_size must be in [1, 16777216], "
                                   "got 1000000000000"),
        (["--rope-scaling", "{type = 'dynamic', factor = 1e300, "
                            "original_max_position_embeddings = 16}"],
         "--rope-scaling: model.rope_scaling runs factor x original_max_position_embeddings = "
         "1.6e+301 positions, more than the 16,777,216 a model may run"),
        (["--rope-scaling", "{type = 'linear', factor = 1048577, "
                            "original_max_position_embeddings = 16}"], "= 16,777,232 positions"),
    ],
)  # fmt: skip
def test_a_context_past_the_limit_is_refused_before_any_table_is_built(
    capsys, data_dir, tmp_path, flags, said
):
    """Before: an allocator's "can't allocate 8000000000000 bytes" (naming no flag) or an
    OverflowError traceback from building the rotary tables."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      position_encoding="rope")  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "m", tokenizer="bytes")
    code, _, err = run(capsys, "--ckpt", tmp_path / "m", "--data", data_dir, *flags)
    assert code == 2 and said in err, err
