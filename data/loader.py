"""Rank-aware, resumable batches of token windows read from memory-mapped shards.

A split (the concatenation of its shards, N tokens) is read as one global stream of sequences
k = 0, 1, 2, ...; each sequence is a window of block_size + 1 tokens (x = first T, y = last T).
Every call to `next_batch()` consumes the next G = micro_batch_size * world_size sequences of
that stream, and rank r takes sequences [r*M, (r+1)*M) of them. Which window sequence k is
depends only on (seed, mode, block_size, k), so the global batch is the same set of sequences
whatever the world size, and the whole state is one integer, `position` (= k of the next
micro-batch), which also lets a run resume on a different number of ranks.

- mode="random": window k starts at splitmix64(seed, k) mod (N - T): nanoGPT-style random
  windows, but counter-based, so no RNG state needs saving.
- mode="sequential": the split is cut into n = (N - 1) // T windows with stride T (consecutive
  windows share one token: the last target of one is the first input of the next). Sequence k
  is window k mod n of epoch k // n; epochs repeat the same order, and a micro-batch may span
  an epoch boundary. Each epoch every token is an input exactly once, except the last
  (N - 1) mod T tokens (fewer than block_size), which no window reaches.

Evaluation: make a `split="val", mode="sequential"` loader once and call `reset()` before each
evaluation; it then yields the same batches every time.
"""

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from gpt.data.shards import HEADER_SIZE, MANIFEST, iter_split, read_manifest

STATE_VERSION = 1
MAX_OPEN_SHARDS = 32  # per loader; a run has one per data set and split it reads
MODES = ("random", "sequential")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser (Steele, Lea & Flood, 2014): a fast, well-mixed 64-bit hash, the
    # same on every machine. uint64 arithmetic wraps, which is what the algorithm needs.
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) windows -> inputs x and targets y, each (B, T) int64."""
    batch = torch.from_numpy(windows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ShardCache:
    """The shards of a split, indexable like a list of memory maps, of which at most
    ``MAX_OPEN_SHARDS`` (the most recently read) are open: each map holds a file descriptor,
    and a split of many small shards (``--shard-tokens``) would otherwise exhaust the
    process's limit (``ulimit -n``, often 1024). Re-opening a shard that was validated at
    start-up costs an open and an mmap."""

    def __init__(self, shards: list[tuple[Path, np.dtype, int]]) -> None:
        self.shards = shards  # (path, dtype, tokens) of each shard
        self.maps: OrderedDict[int, np.ndarray] = OrderedDict()
        # what each validated file is: a shard re-opened later must still be that file
        self.identity = [_identity(path) for path, _, _ in shards]

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> np.ndarray:
        tokens = self.maps.pop(index, None)
        if tokens is None:
            if len(self.maps) >= MAX_OPEN_SHARDS:
                self.maps.popitem(last=False)  # the least recently read: closed once unused
            path, dtype, count = self.shards[index]
            if _identity(path) != self.identity[index]:
                raise ValueError(
                    f"{path}: the shard changed since the loader checked it (the data set was "
                    "prepared again during the run?); restart to use the new data"
                )
            tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
        self.maps[index] = tokens
        return tokens


class TokenLoader:
    """Batches (x, y) of shape (micro_batch_size, block_size) for one rank; see module doc."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        block_size: int,
        micro_batch_size: int,
        *,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mode: str = "random",
        encoding: str | None = None,
        vocab_size: int | None = None,
        verify: str = "full",
    ) -> None:
        for name, value in [
            ("block_size", block_size),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum", grad_accum),
            ("world_size", world_size),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.data_dir, self.split, self.mode, self.seed = Path(data_dir), split, mode, seed
        self.block_size, self.micro_batch_size = block_size, micro_batch_size
        # grad_accum does not change the stream (each call consumes the next micro-batch); it
        # is kept so the trainer can read batch geometry from one object.
        self.grad_accum = grad_accum
        self.rank, self.world_size = rank, world_size

        manifest = read_manifest(self.data_dir)
        manifest_path = self.data_dir / MANIFEST
        if encoding is not None and manifest["encoding"] != encoding:
            raise ValueError(
                f"{manifest_path}: data encoded with {manifest['encoding']!r}, "
                f"the model expects {encoding!r}"
            )
        if vocab_size is not None and manifest["n_vocab"] > vocab_size:
            raise ValueError(
                f"{manifest_path}: encoding {manifest['encoding']!r} has {manifest['n_vocab']} "
                f"tokens, more than the model's vocab_size {vocab_size}"
            )
        self.manifest = manifest
        # every shard is validated now, one open at a time, and re-opened when read
        shards = iter_split(self.data_dir, split, verify)
        self._shards = ShardCache([(p, t.dtype, len(t)) for p, t in shards if len(t)])
        self._starts = np.cumsum([0] + [n for _, _, n in self._shards.shards])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens == 0:
            todo = "prepare more data"
            if split == "val":
                todo = "set train.eval_interval = 0, or re-run prepare with a larger --val-fraction"
            raise ValueError(
                f"{manifest_path}: split {split!r} is empty (prepared with --val-fraction 0, or "
                f"from too few documents): {todo}"
            )
        if self.n_tokens < block_size + 1:
            fits = f"use a block_size of at most {self.n_tokens - 1}, or " * (self.n_tokens > 1)
            raise ValueError(
                f"{manifest_path}: split {split!r} has {self.n_tokens} tokens, fewer than "
                f"block_size + 1 = {block_size + 1} (block_size larger than the data): "
                f"{fits}prepare more data"
            )
        self.n_windows = (self.n_tokens - 1) // block_size  # sequential mode's epoch length
        self._key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        self.position = 0

    @property
    def epoch(self) -> int:
        """Completed passes over the split (sequential); tokens drawn / N for random mode."""
        if self.mode == "sequential":
            return self.position // self.n_windows
        return self.position * self.block_size // self.n_tokens

    @property
    def passes(self) -> float:
        """Passes over the split so far, fractional: windows read / windows in the split
        (sequential), tokens drawn / N (random); ``epoch`` is its whole part."""
        if self.mode == "sequential":
            return self.position / self.n_windows
        return self.position * self.block_size / self.n_tokens

    def _window(self, start: int) -> np.ndarray:
        # A window may straddle shards: gather its pieces.
        end = start + self.block_size + 1
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < end:
            local = start - int(self._starts[i])
            piece = self._shards[i][local : local + end - start]
            pieces.append(piece)
            start += len(piece)
            i += 1
        # a copy, never a view: a view would keep its shard's map (and file) open after the
        # cache let it go, one per sequence of a batch
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def _starts_of(self, k: np.ndarray) -> np.ndarray:
        if self.mode == "sequential":
            return (k % self.n_windows) * self.block_size
        n_starts = np.uint64(self.n_tokens - self.block_size)
        return (
            _splitmix64(self._key + (k.astype(np.uint64) + np.uint64(1)) * _GOLDEN) % n_starts
        ).astype(np.int64)

    def sequences(self, k: np.ndarray) -> np.ndarray:
        """Sequences number ``k`` of the stream (any indices), (len(k), T+1) int64."""
        starts = self._starts_of(np.asarray(k, dtype=np.int64))
        return np.stack([self._window(int(s)) for s in starts]).astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x, y int64 tensors of shape (B, T), y = x shifted by 1."""
        m = self.micro_batch_size
        first = self.position + self.rank * m
        windows = self.sequences(np.arange(first, first + m, dtype=np.int64))
        self.position += m * self.world_size
        return split_xy(windows)

    def reset(self) -> None:
        """Start again from the first sequence (used before each evaluation)."""
        self.position = 0

    def state_dict(self) -> dict:
        """A small JSON-serialisable dict; `position` counts global sequences, not steps."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "mode": self.mode,
            "seed": self.seed,
            "block_size": self.block_size,
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (world_size and micro-batch may differ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        for key in ("split", "mode", "seed", "block_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; they must match to resume"
                )
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state position must be an integer >= 0, got {position!r}")
        self.position = position
