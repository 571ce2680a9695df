"""Launch configurations of the attention kernels: candidate tiles, pruning, length buckets.

Autotuning (Triton's ``triton.autotune``) compiles and times every candidate configuration
the first time it sees a new *key*. Two rules keep that cheap:

* The key holds sequence lengths rounded up to a power of two (``length_bucket``), never the
  exact lengths: decoding grows the key length S by one per token, and an exact key would
  re-run the whole search at every step. With buckets a decode of n tokens tunes at most
  log2(n) + 1 times, and a length in a known bucket reuses its configuration.
* Candidates are pruned before anything is compiled (``early_config_prune``): those whose
  tiles cannot fit the shared memory of one streaming multiprocessor, or whose fp32
  accumulators would spill registers, are dropped for the head dim and dtype at hand. With
  ``GPT_FLASH_TUNE=quick`` in the environment (read at each new key, so tests may set it
  late) only the first survivor is kept: one compile per kernel and key, no timing at all.

The budgets are estimates, not measurements: ``tests/test_flash_attention.py`` compiles the
largest survivors for an H100 with Triton's real compiler to check them (slow tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import triton

TUNE_ENV = "GPT_FLASH_TUNE"
TUNE_MODES = ("full", "quick")
# An H100 gives one program (CTA) at most 227 KiB of shared memory; Triton needs a little
# for its own barriers and layout conversions, so the estimate must stay under this.
SHARED_MEMORY_BUDGET = 200 * 1024
# fp32 accumulator and score values per thread. A thread has at most 255 registers: past
# that the compiler spills for certain (HARD_REGISTER_LIMIT); the kernels also need about a
# third of them for operands, pointers and indices (REGISTER_BUDGET, an estimate).
REGISTER_BUDGET = 160
HARD_REGISTER_LIMIT = 255


def length_bucket(n: int) -> int:
    """The autotune key of a sequence length: the next power of two (1, 2, 4, ..., 16384)."""
    return 1 << max(0, int(n) - 1).bit_length()


def tune_mode() -> str:
    mode = os.environ.get(TUNE_ENV, "full")
    if mode not in TUNE_MODES:
        raise ValueError(f"{TUNE_ENV}={mode!r} is not valid; use one of {', '.join(TUNE_MODES)}")
    return mode


@dataclass(frozen=True)
class Tile:
    """One candidate launch: the tile held in SRAM for the whole program (``held`` rows),
    the tiles streamed past it (``streamed`` rows, ``stages`` of them in flight), warps."""

    held: int
    streamed: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Footprint:
    """What one program of a kernel keeps on chip, in units of tile sides.

    held_tiles / streamed_tiles: how many (rows, D) tiles of the input dtype are held /
    streamed per stage (forward: Q held, K and V streamed: 1 and 2). acc_d: fp32 (held, D)
    accumulators (forward 1: O; dK/dV 2). acc_scores: fp32 (held, streamed) score-sized
    tiles alive at once (forward 1: S then P; backward 2: P and dP).
    """

    held_tiles: int
    streamed_tiles: int
    acc_d: int
    acc_scores: int

    def shared_bytes(self, tile: Tile, block_d: int, elem_bytes: int) -> int:
        rows = self.held_tiles * tile.held + self.streamed_tiles * tile.streamed * tile.stages
        return rows * block_d * elem_bytes

    def registers_per_thread(self, tile: Tile, block_d: int) -> float:
        values = self.acc_d * tile.held * block_d + self.acc_scores * tile.held * tile.streamed
        return values / (32 * tile.warps)

    def fits(self, tile: Tile, block_d: int, elem_bytes: int, registers: float) -> bool:
        return (
            self.shared_bytes(tile, block_d, elem_bytes) <= SHARED_MEMORY_BUDGET
            and self.registers_per_thread(tile, block_d) <= registers
        )


def configs(
    tiles: Sequence[Tile], holds_queries: bool, pre_hook: Callable | None = None
) -> list[triton.Config]:
    """triton.Config objects; BLOCK_M counts query rows and BLOCK_N key rows in every kernel,
    so a kernel that holds keys (dK/dV) gets its held side as BLOCK_N."""
    out = []
    for t in tiles:
        m, n = (t.held, t.streamed) if holds_queries else (t.streamed, t.held)
        out.append(
            triton.Config(
                {"BLOCK_M": m, "BLOCK_N": n},
                num_warps=t.warps,
                num_stages=t.stages,
                pre_hook=pre_hook,
            )
        )
    return out


def tile_of(config: triton.Config, holds_queries: bool) -> Tile:
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    held, streamed = (m, n) if holds_queries else (n, m)
    return Tile(held, streamed, config.num_warps, config.num_stages)


def prune(
    candidates: list[triton.Config],
    named_args: dict,
    footprint: Footprint,
    holds_queries: bool,
    keep: Callable[[Tile, dict], bool] | None = None,
    registers: float = REGISTER_BUDGET,
    **kwargs,
) -> list[triton.Config]:
    """Triton's ``early_config_prune``: the candidates that fit on chip for this call's head
    dim and dtype (and pass ``keep``), in table order; only the first in quick mode.
    ``registers`` is the per-thread budget of fp32 accumulator values (see above).

    Never empty: if nothing fits (an estimate too strict for some head dim) the smallest
    candidate is kept, and the compiler has the last word."""
    args = {**named_args, **kwargs}
    block_d, elem = args["BLOCK_D"], args["Q"].element_size()
    tiles = [tile_of(c, holds_queries) for c in candidates]
    allowed = [keep is None or keep(t, args) for t in tiles]
    survivors = [
        c
        for c, t, ok in zip(candidates, tiles, allowed, strict=True)
        if ok and footprint.fits(t, block_d, elem, registers)
    ]
    if not survivors:
        pool = [c for c, ok in zip(candidates, allowed, strict=True) if ok] or candidates
        survivors = [min(pool, key=lambda c: footprint.shared_bytes(tile_of(c, holds_queries),
                                                                      block_d, elem))]  # fmt: skip
    return survivors[:1] if tune_mode() == "quick" else survivors
