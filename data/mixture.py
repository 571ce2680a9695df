"""Weighted mixtures: one global stream of sequences drawn from several prepared data sets.

Sources 0..m-1 have exact weights p_i (``exact_weights``: 0.7 is 7/10, normalised to sum 1).
Global sequence k (k = 0, 1, ...) comes from one source, chosen from the counts C_i(k), how
many of the first k sequences each source gave:

- source 0 (the first listed) whenever C_0(k) < (k+1) p_0, so C_0(n) = ceil(n p_0) for all n;
- otherwise, among the sources i >= 1 with C_i(k) < (k+1) p_i (taking sequence k keeps them at
  most ceil((k+1) p_i)), the one due soonest: the smallest ceil((C_i(k)+1) / p_i), the first n
  with floor(n p_i) > C_i(k); ties go to the source listed first.

**The first n sequences hold floor(n p_i) or ceil(n p_i) from source i, for every n** (the
"quota" property of apportionment, Balinski & Young 1975, here for every prefix at once; so
exactly n p_i when that is a whole number, and any n consecutive ones between floor(n p_i) - 1
and ceil(n p_i) + 1). Why: source 0's rule keeps it at ceil(n p_0) and leaves the slots k
where floor((k+1) s) > floor(k s), s = 1 - p_0, to the others. The others' sequences are unit
jobs, the j-th of source i allowed from slot floor((j-1)/p_i) (its upper bound) and due by
slot ceil(j/p_i) - 1 (its lower bound). The jobs that must run within slots a..b number
sum_i max(0, floor((b+1) p_i) - ceil(a p_i)) <= floor((b+1) s) - floor(a s), the free slots
there (floor(x + y) - ceil(x) <= floor(y) for each source, summed over those with jobs), so by
Hall's theorem a schedule meeting every bound exists, and earliest-deadline-first (the rule
above) finds one: it is optimal for unit jobs (swap any schedule's choice for the earliest
deadline, slot by slot). With
two sources the rule is replay's (gpt/data/replay.py): source 1 gives exactly floor(n p_1).
The pattern repeats every D sequences, D the common denominator of the weights (10 for
0.7/0.2/0.1: web web web code web web code web web books).

Each source is a ``TokenLoader`` whose own stream (seed, mode) is read at its count: the c-th
sequence a source gives is its loader's sequence c, and its ``position`` is its count. A
source never runs out: past its last window it starts another epoch (random mode draws new
windows, sequential mode walks the split again). Every rank computes the whole global batch's
choice (m small integers per sequence) and keeps its slice, so the stream is the same for any
world size, micro-batch and grad_accum; the state is the global position and one count per
source, and it resumes exactly on any world size.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from gpt.data.loader import TokenLoader, split_xy

STATE_VERSION = 1
GEOMETRY = ("block_size", "micro_batch_size", "rank", "world_size")


def exact_weights(weights: dict[str, float | int | str | Fraction]) -> dict[str, Fraction]:
    """``weights`` as exact fractions summing to 1, in the same order: a float as the
    decimal it prints as (0.1 is 1/10, not the binary double nearest it). ValueError for a
    negative or non-finite weight, or none above 0."""
    exact = {}
    for name, w in weights.items():
        if isinstance(w, float) and not math.isfinite(w):
            raise ValueError(f"mixture weight of {name!r} is {w}: it must be a finite number")
        exact[name] = Fraction(str(w)) if isinstance(w, float) else Fraction(w)
        if exact[name] < 0:
            raise ValueError(f"mixture weight of {name!r} is {w}: it must be >= 0")
    total = sum(exact.values())
    if total <= 0:
        raise ValueError(f"mixture weights {dict(weights)} have no weight above 0")
    return {name: w / total for name, w in exact.items()}


class MixtureSchedule:
    """Which source each global sequence comes from (the module docstring's rule), in exact
    integer arithmetic: p_i = units[i] / denominator."""

    def __init__(self, shares: list[Fraction]):
        assert sum(shares) == 1 and all(s >= 0 for s in shares), f"bad shares {shares}"
        self.denominator = math.lcm(*(s.denominator for s in shares))
        self.units = [int(s * self.denominator) for s in shares]

    def assign(self, position: int, counts: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of global sequences position .. position + n - 1 and the number of
        each within its source, given ``counts`` at ``position`` (updated in place)."""
        d, units, rest = self.denominator, self.units, range(1, len(self.units))
        sources, numbers = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for j, k in enumerate(range(position, position + n)):
            if counts[0] * d < (k + 1) * units[0]:
                i = 0
            else:  # some source may take it: the n p_i sum to n, the counts to k
                i = min(
                    (i for i in rest if counts[i] * d < (k + 1) * units[i]),
                    key=lambda i: (-(-(counts[i] + 1) * d // units[i]), i),
                )
            sources[j], numbers[j] = i, counts[i]
            counts[i] += 1
        return sources, numbers

    def within_bounds(self, position: int, counts: list[int]) -> bool:
        """Whether ``counts`` could be the counts at ``position``: they sum to it, source 0
        holds ceil(position p_0) and every other floor or ceil of position p_i."""
        d = self.denominator
        if sum(counts) != position or counts[0] != -(-position * self.units[0] // d):
            return False
        bounds = [(position * a // d, -(-position * a // d)) for a in self.units]
        return all(lo <= c <= hi for (lo, hi), c in zip(bounds, counts, strict=True))


class MixtureLoader:
    """Batches like ``TokenLoader``'s, each sequence from one of ``loaders`` (name -> loader,
    all of one geometry) as the mixture of ``weights`` (name -> weight, in the mixture's
    order: the first source is the one given its upper bound) decides."""

    def __init__(self, loaders: dict[str, TokenLoader], weights: dict[str, float | Fraction]):
        if list(loaders) != list(weights):
            raise ValueError(
                f"mixture sources {list(loaders)} and weights {list(weights)} differ: give "
                "every source one weight, in the same order"
            )
        first, *others = loaders
        for name in others:
            for key in GEOMETRY:
                mine, theirs = getattr(loaders[name], key), getattr(loaders[first], key)
                if mine != theirs:
                    raise ValueError(
                        f"{name} loader {key} = {mine} differs from the {first} loader's {theirs}"
                    )
        self.loaders, self.weights = loaders, exact_weights(weights)
        self.schedule = MixtureSchedule(list(self.weights.values()))
        one = loaders[first]
        self.block_size, self.micro_batch_size = one.block_size, one.micro_batch_size
        self.rank, self.world_size = one.rank, one.world_size
        self.reset()

    @property
    def counts(self) -> dict[str, int]:
        """Sequences each source gave to the global stream so far (all ranks)."""
        return {name: loader.position for name, loader in self.loaders.items()}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.micro_batch_size
        counts = list(self.counts.values())
        sources, numbers = self.schedule.assign(self.position, counts, m * self.world_size)
        mine = slice(self.rank * m, (self.rank + 1) * m)
        sources, numbers = sources[mine], numbers[mine]
        windows = np.empty((m, self.block_size + 1), dtype=np.int64)
        for i, loader in enumerate(self.loaders.values()):
            chosen = sources == i
            if chosen.any():
                windows[chosen] = loader.sequences(numbers[chosen])
        for loader, count in zip(self.loaders.values(), counts, strict=True):
            loader.position = count
        self.position += m * self.world_size
        # this rank's micro-batch, per source (tests, replay's last_replayed)
        per_source = np.bincount(sources, minlength=len(counts)).tolist()
        self.last_counts = dict(zip(self.loaders, per_source, strict=True))
        return split_xy(windows)

    def reset(self) -> None:
        self.position = 0
        for loader in self.loaders.values():
            loader.position = 0

    def progress(self) -> dict[str, int | float]:
        """metrics.jsonl's per-source fields: ``tokens/<name>`` trained on (all ranks) and
        ``epochs/<name>``, passes over the source's training split (``TokenLoader.passes``)."""
        out = {}
        for name, loader in self.loaders.items():
            out[f"tokens/{name}"] = loader.position * self.block_size
            out[f"epochs/{name}"] = loader.passes
        return out

    def state_dict(self) -> dict:
        """A small JSON-serialisable dict: the global position, the exact weights and each
        source's loader state, whose position is its count."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "weights": {name: str(w) for name, w in self.weights.items()},
            "sources": {name: loader.state_dict() for name, loader in self.loaders.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off (world size and micro-batch may differ).
        ValueError for the state of another mixture (sources, their order or weights)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"mixture loader state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        then = state.get("weights")
        now = {name: str(w) for name, w in self.weights.items()}
        if not isinstance(then, dict) or list(then.items()) != list(now.items()):
            raise ValueError(
                f"loader state is of the mixture {then}, this run's is {now} (source: share); "
                "they must match, in the same order, to resume"
            )
        sources = state.get("sources")
        if not isinstance(sources, dict) or list(sources) != list(self.loaders):
            raise ValueError(f"mixture loader state: sources {sources!r} damaged")
        for name, loader in self.loaders.items():
            loader.load_state_dict(sources[name])  # checks seed, mode, block_size, position
        self.restore(state.get("position"), list(self.counts.values()))

    def restore(self, position: int, counts: list[int]) -> None:
        """Set the global position and the sources' counts at it (ValueError if they cannot
        be this mixture's)."""
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state position must be an integer >= 0, got {position!r}")
        if not self.schedule.within_bounds(position, counts):
            raise ValueError(
                f"mixture loader state: counts {dict(zip(self.loaders, counts, strict=True))} "
                f"cannot be the mixture's at position {position}: the state is damaged"
            )
        self.position = position
        for loader, count in zip(self.loaders.values(), counts, strict=True):
            loader.position = count
