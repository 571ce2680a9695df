"""Replay: a fixed fraction of every batch drawn from a second (general) data set.

Fine-tuning on a domain forgets what the base model knew; mixing a little of the general
data back into every batch is the usual remedy (e.g. "replay" in continual learning). Replay
is the two-source mixture (gpt/data/mixture.py) of the domain set, weight 1 - f, and the
replay set, weight f, with f the replay fraction (exact: 0.1 is 1/10). With r(k) = floor(k f),
the mixture's rule gives sequence k to the replay set when r(k + 1) > r(k), as its sequence
number r(k) there, and to the domain set otherwise, as its number k - r(k). So the first n
sequences hold exactly floor(n f) replayed ones, the choice is the same whatever the world
size, and the saved state is one integer (``position``), the counts following from it.
"""

from __future__ import annotations

from fractions import Fraction

from gpt.data.loader import TokenLoader
from gpt.data.mixture import MixtureLoader


class ReplayLoader(MixtureLoader):
    """``domain``'s batches with a fraction ``fraction`` of their sequences from ``replay``.
    Both loaders must have the same block_size, micro-batch, rank and world size; their
    positions become the counts each gave (the mix decides which of their sequences to
    read). Metrics name the two sources ``domain`` and ``replay``."""

    def __init__(self, domain: TokenLoader, replay: TokenLoader, fraction: float):
        if not 0 <= fraction < 1:
            raise ValueError(f"finetune.replay_fraction must be in [0, 1), got {fraction}")
        f = Fraction(str(fraction))  # 0.1 is exactly 1/10
        super().__init__({"domain": domain, "replay": replay}, {"domain": 1 - f, "replay": f})
        self.domain, self.replay, self.fraction = domain, replay, f

    @property
    def last_replayed(self) -> int:
        """Replayed sequences in this rank's last micro-batch."""
        return int(self.last_counts["replay"])

    def replayed_before(self, k: int) -> int:
        """r(k): how many of the first k sequences come from the replay set."""
        return k * self.fraction.numerator // self.fraction.denominator

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "fraction": str(self.fraction),
            "domain": self.domain.state_dict(),
            "replay": self.replay.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off (world size may differ); a state saved
        before replay was a mixture (its loaders' positions 0) loads the same."""
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
        replayed = self.replayed_before(position)
        self.restore(position, [position - replayed, replayed])
