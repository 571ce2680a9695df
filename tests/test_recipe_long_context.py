"""The context-extension recipe's own logic (recipes/long_context.py): the scaling each
method names, the flags that run the base zero-shot, and the checks it writes, decided on
made-up results whose verdicts are known. The recipe's runs themselves are `make
long-context` (about 12 minutes), whose committed results docs/long-context.md shows."""

import argparse
import dataclasses
import tomllib

import pytest

from gpt.cli.model_flags import context_overrides
from recipes import long_context as lc


def test_each_method_names_its_scaling_at_factor_4():
    assert lc.scaling("none", 128) == "{}"
    for m in ("linear", "dynamic", "yarn"):
        table = tomllib.loads(f"v = {lc.scaling(m, 128)}")["v"]
        assert table == {"type": m, "factor": 4, "original_max_position_embeddings": 128}


def test_zero_shot_flags_run_the_base_at_4_t0(tmp_path):
    """The flags the recipe passes are ones the evaluation commands take, and each gives a
    model that runs 4 x T0 positions."""
    from gpt import GPT, ModelConfig

    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      position_encoding="rope")  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "m", tokenizer="bytes")
    for m in lc.METHODS:
        flags = lc.context_flags(m, 16)
        args = argparse.Namespace(ckpt=str(tmp_path / "m"), rope_scaling=None, block_size=None)
        setattr(args, flags[0].removeprefix("--").replace("-", "_"), flags[1])
        if args.block_size is not None:
            args.block_size = int(args.block_size)
        overrides = context_overrides(args)
        assert dataclasses.replace(cfg, **overrides).max_positions == 64


def result(per_position, grid, lengths):
    return {
        "positions": {"per_position": per_position},
        "passkey": {"accuracy": grid, "config": {"lengths": lengths}},
    }


def rows(yarn_long=1.0, yarn_short=1.0, yarn_cell=1.0, none_long=3.0):
    """Rows for every method and phase: T0 = 4, positions [0, 16); flat losses except where
    a check looks."""
    out = []
    for m in lc.METHODS:
        for phase in ("zero-shot", "fine-tuned"):
            per = [1.0] * 16
            grid = [[1.0] * 5 for _ in range(4)]
            if (m, phase) == ("yarn", "fine-tuned"):
                per = [yarn_short] * 4 + [yarn_long] * 12
                grid[3][0] = yarn_cell
            if (m, phase) == ("none", "zero-shot"):
                per = [1.0] * 4 + [none_long] * 12
            out.append(lc.summarise(m, phase, result(per, grid, [4, 8, 12, 16]), 4))
    return out


def base():
    return lc.summarise("base", "trained", result([1.0] * 4, [[1.0] * 5], [4]), 4)


def verdicts(**kw):
    return [ok for _, ok, _ in lc.checks(rows(**kw), base())]


def test_the_checks_pass_when_every_criterion_holds():
    assert verdicts() == [True, True, True, True]


@pytest.mark.parametrize(
    "kw, failing",
    [
        ({"yarn_long": 1.01}, 0),  # loss past T0 above that over [T0/2, T0)
        ({"yarn_short": 1.03, "yarn_long": 1.03}, 1),  # 3% worse than the base below T0
        ({"yarn_cell": 0.9}, 2),  # one cell at 90%
        ({"none_long": 1.0}, 3),  # no scaling does not degrade: the control failed
    ],
)
def test_each_check_fails_on_its_own_criterion(kw, failing):
    got = verdicts(**kw)
    assert got[failing] is False
    assert all(ok for i, ok in enumerate(got) if i != failing)


def test_better_than_the_base_below_t0_is_not_a_failure():
    """The 2% bound guards the base's short-context quality: a fine-tune that lowers the loss
    below T0 (it also trains on Shakespeare) passes."""
    assert verdicts(yarn_short=0.9, yarn_long=0.9)[1] is True


def test_the_table_shows_every_row_and_check():
    text = lc.table(rows(yarn_cell=0.9), base(), lc.checks(rows(yarn_cell=0.9), base()), 4)
    assert text.count("| yarn |") == 2 and "| base |" in text
    assert "| NO |" in text and "lowest cell 90%" in text
