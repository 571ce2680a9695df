"""The fine-tuning recipe (recipes/finetune.py): its four methods are valid train.py
overrides of its config, and its table reads a run's numbers as a hand-worked row says. The
runs themselves are train.py's (tests/test_finetune.py); `make finetune` runs the recipe."""

import pytest

from gpt.config_io import load_config
from recipes import finetune

ROOT = finetune.ROOT


@pytest.mark.parametrize("method", list(finetune.METHODS))
def test_every_method_is_a_valid_override_of_the_recipe_config(method):
    cfg = load_config(ROOT / "configs" / "finetune-pydocs.toml", finetune.METHODS[method])
    assert cfg.train.init_from != "scratch"  # every method adapts the same base
    given = {arg[2:].split("=")[0] for arg in finetune.METHODS[method]}
    assert given <= cfg.given


def test_table_row_from_a_run():
    row = {
        "method": "lora", "trainable_params": 49_152, "params": 7_242_624, "seconds": 61.4,
        "domain_before": 8.5181, "domain_after": 7.5224, "general_before": 5.6342,
        "general_after": 6.0513, "forgetting": 6.0513 - 5.6342,
    }  # fmt: skip
    lines = finetune.table([row]).splitlines()
    assert lines[0].startswith("| method | trainable params | domain loss before -> after")
    assert lines[2] == (
        "| lora | 49,152 (0.7%) | 8.518 -> 7.522 | 5.634 -> 6.051 | +0.417 | 61 s |"
    )
