"""What keeps the training step fast, counted with torch's own instruments rather than timed:
host synchronisations per optimizer step, recompilations of the compiled training graph,
and bf16 (autocast) training against fp32. (The trainer's step timed against a bare loop:
tests/test_bench_trainer.py.)"""

import functools

import pytest
import torch
from runs import config, losses, records
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gpt.cli import train
from gpt.config_io import load_config
from gpt.model import GPT
from gpt.train import trainer as trainer_module
from gpt.train.engine import deepspeed_config, precision

# What a GPU would wait for: every .item(), bool(t), float(t) reaches the dispatcher as
# aten._local_scalar_dense; .tolist() copies without it, so it is counted one level up.
SCALAR_READ = torch.ops.aten._local_scalar_dense.default


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is SCALAR_READ
        return func(*args, **(kwargs or {}))


class ToListCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.Tensor.tolist
        return func(*args, **(kwargs or {}))


def synchronisations(args: list[str]) -> int:
    """Host reads of tensors during a whole ``train.py`` run."""
    import deepspeed  # noqa: F401  (imported under the counters, it takes a minute)

    with ToListCounter() as lists, SyncCounter() as scalars:
        assert train.main(args) == 0
    return lists.count + scalars.count


@pytest.mark.parametrize(
    "overrides, most",
    [
        ([], 0),
        (["--train.dtype=bf16"], 0),  # autocast: fp32 weights, the same optimizer step
    ],
    ids=["fp32", "bf16-autocast"],
)
def test_a_training_step_reads_almost_nothing_back_from_the_device(
    tmp_path, data_dir, overrides, most
):
    """The issue's count: a 5-step run minus a 2-step run, both logged, evaluated and saved
    only at their end, so the difference is what 3 ordinary steps cost (the issue allows 2
    per step; what we have is tighter). 3 micro-batches a step, so that a read per
    micro-batch (3 per step) exceeds even the issue's limit."""
    path, _ = config(tmp_path, data_dir)
    quiet = [
        "--train.grad_accum=3",
        "--train.log_interval=1000",
        "--train.eval_interval=0",
        "--train.ckpt_interval=1000",
        *overrides,
    ]
    runs = {
        steps: synchronisations(
            [str(path), f"--train.max_steps={steps}", f"--train.out_dir={tmp_path / str(steps)}"]
            + quiet
        )
        for steps in (2, 5)
    }
    assert runs[2] > 0  # the counter sees the end-of-run reads (flush, checkpoint)
    assert (runs[5] - runs[2]) / 3 <= most <= 2, runs


def compile_eagerly(monkeypatch) -> None:
    """engine.compile() with Dynamo's "eager" backend: the same graphs, guards and
    recompilations as inductor (they are Dynamo's), without compiling kernels."""
    from deepspeed import DeepSpeedEngine

    compile_fn = DeepSpeedEngine.compile
    monkeypatch.setattr(
        DeepSpeedEngine, "compile", functools.partialmethod(compile_fn, backend="eager")
    )


@pytest.mark.parametrize(
    "backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)], ids=str
)
def test_evaluation_and_samples_never_recompile_the_training_graph(
    tmp_path, data_dir, monkeypatch, backend
):
    """Train (the forward is compiled at the first step), evaluate with samples at step 2,
    train on and evaluate at the end: Dynamo holds one graph of ``GPT.forward`` throughout."""
    if backend == "eager":
        compile_eagerly(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    graphs = {}
    step = trainer_module.Trainer.train_step

    def counted_step(self):
        out = step(self)
        graphs[self.step + 1] = counters["stats"]["unique_graphs"]
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted_step)
    path, out = config(tmp_path, data_dir)
    args = [
        str(path),
        "--train.compile=true",
        "--train.max_steps=4",
        "--train.eval_interval=2",
        "--train.eval_steps=1",
        "--train.sample_tokens=3",
        "--train.grad_accum=1",
        "--model.n_layer=1",
    ]
    assert train.main(args) == 0
    assert [r["step"] for r in records(out) if "samples" in r] == [2, 4]
    assert graphs[1] >= 1 and graphs == dict.fromkeys(range(1, 5), graphs[1]), graphs
    assert len(_debug_get_cache_entry_list(GPT.forward.__code__)) == 1
    torch._dynamo.reset()


def test_precision_modes_map_to_deepspeed_sections(tmp_path, data_dir):
    """(mode, DeepSpeed's torch_autocast, its bf16 weights, its gradient_clipping): where
    the weights stay fp32, GuardedAdamW clips and DeepSpeed does not."""
    path, _ = config(tmp_path, data_dir)
    bf16, ds_bf16 = "--train.dtype=bf16", "--deepspeed.bf16.enabled=true"
    cases = {
        (): ("fp32", False, False, 0.0),
        (bf16,): ("autocast", True, False, 0.0),
        (bf16, "--deepspeed.zero_optimization.stage=2"): ("autocast", True, False, 1.0),
        (bf16, ds_bf16): ("deepspeed-bf16", False, True, 1.0),
        (bf16, ds_bf16, "--deepspeed.zero_optimization.stage=1"): (
            "deepspeed-bf16",
            False,
            True,
            1.0,
        ),
    }
    for overrides, expected in cases.items():
        cfg = load_config(path, list(overrides))
        ds = deepspeed_config(cfg, 1)
        got = (
            precision(cfg),
            ds["torch_autocast"]["enabled"],
            ds["bf16"]["enabled"],
            ds["gradient_clipping"],
        )
        assert got == expected, overrides


def test_deepspeed_bf16_weights_need_train_dtype_bf16(tmp_path, data_dir, capsys):
    path, _ = config(tmp_path, data_dir)
    assert train.main([str(path), "--deepspeed.bf16.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.bf16.enabled = true (bf16 weights) needs train.dtype = 'bf16'" in err
    assert "got 'fp32'" in err


def test_bf16_autocast_trains_close_to_fp32(tmp_path, data_dir):
    """Same seed and batches: bf16 autocast losses stay within bf16's rounding of fp32's
    over a few steps, the weights stay fp32, and the step count is the same."""
    quiet = ["--train.max_steps=4", "--train.eval_interval=0", "--train.ckpt_interval=1000"]
    path, out_32 = config(tmp_path, data_dir, "fp32")
    assert train.main([str(path), *quiet]) == 0
    path, out_16 = config(tmp_path, data_dir, "bf16")
    assert train.main([str(path), *quiet, "--train.dtype=bf16"]) == 0
    fp32, bf16 = losses(out_32), losses(out_16)
    assert fp32.keys() == bf16.keys() == set(range(1, 5))
    assert fp32 != bf16  # autocast really ran in bf16
    for step in fp32:
        assert abs(fp32[step] - bf16[step]) <= 0.02 * fp32[step], (step, fp32, bf16)
    from runs import final_params

    assert all(t.dtype == torch.float32 for t in final_params(out_16).values())
