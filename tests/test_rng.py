"""gpt/train/rng.py: random-number state as JSON. Restoring a saved state makes Python,
numpy and torch draw again exactly what they drew after it was saved; a state file of the
wrong shape is a CheckpointError naming the file; none (a rank that was not saved) is None."""

import json
import random

import numpy as np
import pytest
import torch

from gpt.store import CheckpointError
from gpt.train.rng import read_rng_state, rng_file, rng_state, set_rng_state


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_a_restored_state_draws_the_same_numbers(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # move off the seeds
    saved = json.loads(json.dumps(rng_state()))  # through JSON, as in a checkpoint
    first = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert draws() != first
    set_rng_state(saved)
    assert draws() == first


def test_a_state_file_reads_back(tmp_path):
    rng_file(tmp_path, 0).write_text(json.dumps(rng_state()))
    state = read_rng_state(tmp_path)
    first = draws()
    set_rng_state(state)
    assert draws() == first


def test_no_file_for_this_rank_is_none(tmp_path):
    assert read_rng_state(tmp_path) is None


def damage(state: dict, how: str) -> dict:
    if how == "short python state":
        state["python"][1] = state["python"][1][:-1]
    elif how == "numpy keys":
        state["numpy"][1] = state["numpy"][1][:10]
    elif how == "torch not base64":
        state["torch"] = "not base64!"
    elif how == "missing torch":
        del state["torch"]
    elif how == "gauss a string":
        state["python"][2] = "0.5"
    return state


@pytest.mark.parametrize(
    "how",
    ["short python state", "numpy keys", "torch not base64", "missing torch", "gauss a string"],
)
def test_a_state_of_the_wrong_shape_is_named(tmp_path, how):
    file = rng_file(tmp_path, 0)
    file.write_text(json.dumps(damage(rng_state(), how)))
    with pytest.raises(CheckpointError, match=rf"{file}: damaged"):
        read_rng_state(tmp_path)


@pytest.mark.parametrize("text", ["", "{", "[]", "null"])
def test_a_state_file_that_is_not_the_object_is_named(tmp_path, text):
    file = rng_file(tmp_path, 0)
    file.write_text(text)
    with pytest.raises(CheckpointError, match=rf"{file}: damaged"):
        read_rng_state(tmp_path)
