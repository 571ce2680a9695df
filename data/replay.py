"""Replay: a fixed fraction of every batch drawn from a second (general) data set.

Fine-tuning on a domain forgets what the base model knew; mixing a little of the general
data back into every batch is the usual remedy (e.g. "replay" in continual learning). The
mixed stream is, like ``TokenLoader``'s, a pure function of the global sequence number k:
with f the replay fraction and r(k) = floor(k * f) (exact rational arithmetic), sequence k
comes from the replay set when r(k + 1) > r(k), as its sequence number r(k) there, and from
the domain set otherwise, as its number k - r(k). So the first n sequences hold exactly
floor(n * f) replayed ones, the choice is the same whatever the world size, and the whole
state is one integer (``position``), as for ``TokenLoader``.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from gpt.data.loader import TokenLoader, split_xy


class ReplayLoader:
    """``domain``'s batches with a fraction ``fraction`` of their sequences from ``replay``.
    Both loaders must have the same block_size, micro-batch, rank and world size; their own
    positions are not used (the mix decides which of their sequences to read)."""

    def __init__(self, domain: TokenLoader, replay: TokenLoader, fraction: float):
        if not 0 <= fraction < 1:
            raise ValueError(f"finetune.replay_fraction must be in [0, 1), got {fraction}")
        for key in ("block_size", "micro_batch_size", "rank", "world_size"):
            if getattr(domain, key) != getattr(replay, key):
                raise ValueError(
                    f"replay loader {key} = {getattr(replay, key)} differs from the domain "
                    f"loader's {getattr(domain, key)}"
                )
        self.domain, self.replay = domain, replay
        self.fraction = Fraction(str(fraction))  # 0.1 is exactly 1/10
        self.micro_batch_size, self.world_size = domain.micro_batch_size, domain.world_size
        self.rank, self.position = domain.rank, 0

    def replayed_before(self, k: np.ndarray) -> np.ndarray:
        """r(k): how many of the first k sequences come from the replay set."""
        return (k * self.fraction.numerator) // self.fraction.denominator

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.micro_batch_size
        first = self.position + self.rank * m
        k = np.arange(first, first + m, dtype=np.int64)
        r, r_next = self.replayed_before(k), self.replayed_before(k + 1)
        from_replay = r_next > r
        windows = np.empty((m, self.domain.block_size + 1), dtype=np.int64)
        if from_replay.any():
            windows[from_replay] = self.replay.sequences(r[from_replay])
        if (~from_replay).any():
            windows[~from_replay] = self.domain.sequences((k - r)[~from_replay])
        self.position += m * self.world_size
        self.last_replayed = int(from_replay.sum())  # for tests and accounting
        return split_xy(windows)

    def reset(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "fraction": str(self.fraction),
            "domain": self.domain.state_dict(),
            "replay": self.replay.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off (world size may differ)."""
        if state.get("fraction") != str(self.fraction):
            raise ValueError(
                f"loader state has replay fraction {state.get('fraction')}, this run has "
                f"{self.fraction}; they must match to resume"
            )
        self.domain.load_state_dict(state["domain"])  # checks seed, mode, block_size
        self.replay.load_state_dict(state["replay"])
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state position must be an integer >= 0, got {position!r}")
        self.position = position
