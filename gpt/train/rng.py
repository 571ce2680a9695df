"""Random-number state of a training process, as JSON (never pickle): ``rng_rank{r}.json``.

Every rank saves the states of Python's ``random``, numpy's global generator and torch's
(CPU, and the current CUDA device when there is one) with each checkpoint, so a resumed run
draws what the uninterrupted one would have (dropout, data order). JSON rather than
``torch.save``: a checkpoint must never run code when loaded.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from gpt.store import CheckpointError
from gpt.train import dist

MT19937_WORDS = 624  # the Mersenne Twister's state: 624 words, + the position for Python's


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng_rank{rank}.json"


def rng_state() -> dict:
    """Python, numpy and torch (CPU and current CUDA device) RNG states, as JSON: no pickle."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (the CUDA state only where there is a device)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(
        torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8)
    )
    if "cuda" in state and torch.cuda.is_available():
        raw = bytearray(base64.b64decode(state["cuda"]))
        torch.cuda.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8))


def read_rng_state(ckpt: Path) -> dict | None:
    """This rank's ``rng_rank{r}.json`` with its shape checked (None when absent: resuming
    on more ranks than were saved); CheckpointError naming the file when damaged."""
    path = rng_file(ckpt, dist.rank())
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        ok = (
            isinstance(version, int) and isinstance(internal, list)
            and len(internal) == MT19937_WORDS + 1
            and all(isinstance(v, int) for v in internal) and isinstance(kind, str)
            and isinstance(keys, list) and len(keys) == MT19937_WORDS and isinstance(pos, int)
            and isinstance(state["torch"], str)
            and (gauss is None or isinstance(gauss, float))
            and isinstance(has_gauss, int) and isinstance(cached, float)
        )  # fmt: skip
        base64.b64decode(state["torch"], validate=True)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: damaged: not the random-number state this trainer writes")
    return state
