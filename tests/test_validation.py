"""gpt/eval/validation.py and the trainer's evaluation: validation losses are measured with
dropout off (the model in eval mode), against a float64 eval-mode reference, the same at
every call, over the same first batches; after evaluating, training goes on in training
mode, its losses unchanged by how often it is evaluated. A model with dropout 0.5 makes any
of these mistakes visible (with dropout 0, as in the other trainer tests, none is)."""

import pytest
import torch
from runs import config, losses, records

from gpt.cli import train
from gpt.data.loader import TokenLoader
from gpt.eval.validation import validation_loss
from gpt.model import GPT, ModelConfig
from gpt.store import latest_checkpoint

MODEL = dict(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=32)


def reference_loss(model: GPT, data_dir, steps: int, batch: int) -> float:
    """The mean loss over the first ``steps`` sequential validation batches, computed in
    float64 on an eval-mode copy of ``model``."""
    import copy

    ref = copy.deepcopy(model).double().eval()
    val = TokenLoader(data_dir, "val", model.cfg.block_size, batch, mode="sequential")
    with torch.no_grad():
        return sum(ref(*val.next_batch())[1].item() for _ in range(steps)) / steps


@pytest.mark.parametrize("steps", [1, 3])
def test_validation_loss_is_the_mean_over_the_first_batches(data_dir, steps):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL, dropout=0.5)).eval()
    val = TokenLoader(data_dir, "val", 16, 4, mode="sequential")
    first = validation_loss(model, val, steps, torch.device("cpu"))
    assert first.dtype == torch.float64 and first.dim() == 0
    assert first.item() == pytest.approx(reference_loss(model, data_dir, steps, 4), rel=1e-6)
    val.next_batch()  # wherever the loader was left, evaluation starts from the first batch
    assert torch.equal(validation_loss(model, val, steps, torch.device("cpu")), first)


def test_the_trainer_validates_in_eval_mode(tmp_path, data_dir):
    """val_loss at the last step equals the float64 eval-mode loss of the checkpoint saved
    at that step. With dropout 0.5 left on it would be off by far more than rounding."""
    path, out = config(tmp_path, data_dir, dropout=0.5)
    args = ["--train.max_steps=4", "--train.eval_interval=2", "--train.ckpt_interval=4"]
    assert train.main([str(path), *args, "--train.eval_steps=3"]) == 0
    evaluated = {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}
    assert list(evaluated) == [2, 4]
    model = GPT(ModelConfig(**MODEL, dropout=0.5))  # tests/runs.py's TINY
    # the engine's own copy of the weights (the export is in Hugging Face's layout); our
    # run's file, trusted
    ds = latest_checkpoint(out) / "ds" / "state" / "mp_rank_00_model_states.pt"
    model.load_state_dict(torch.load(ds, weights_only=False)["module"])
    want = reference_loss(model, data_dir, steps=3, batch=4)
    assert evaluated[4] == pytest.approx(want, rel=1e-5)


def test_training_after_an_evaluation_is_still_in_training_mode(tmp_path, data_dir):
    """Evaluating at every step, or never, trains the same: dropout is back on after each
    evaluation (eval mode left on would drop nothing) and evaluation draws no random
    numbers."""
    path_a, out_a = config(tmp_path, data_dir, "never", dropout=0.5)
    path_b, out_b = config(tmp_path, data_dir, "always", dropout=0.5)
    assert train.main([str(path_a), "--train.max_steps=4", "--train.eval_interval=0"]) == 0
    assert train.main([str(path_b), "--train.max_steps=4", "--train.eval_interval=1"]) == 0
    assert [r["step"] for r in records(out_b) if "val_loss" in r] == [1, 2, 3, 4]
    assert losses(out_a) == losses(out_b)
