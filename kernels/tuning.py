"""Launch configurations of the attention kernels: candidate tiles, pruning, length buckets.

Autotuning (Triton's ``triton.autotune``) compiles and times every candidate configuration
the first time it sees a new *key*. Three rules keep that cheap:

* The key holds sequence lengths rounded up to a power of two (``length_bucket``), never the
  exact lengths: decoding grows the key length S by one per token, and an exact key would
  re-run the whole search at every step. With buckets a decode of n tokens tunes at most
  log2(n) + 1 times, and a length in a known bucket reuses its configuration.
* Candidate tables are short and chosen per head dim from the compiler's own resource
  report (``python -m gpt.kernels.resources``: registers, spills, shared memory for an
  H100, no GPU needed): tiles that spill registers at a head dim are not candidates there.
* Before anything is compiled, ``prune`` (Triton's ``early_config_prune``) drops the
  candidates whose tiles cannot fit one multiprocessor's shared memory in this call's
  dtype (float32 needs twice bfloat16's), and those a kernel's own rule excludes. With
  ``GPT_FLASH_TUNE=quick`` in the environment (read at each new key, so tests may set it
  late) only the first survivor is kept: one compile per kernel and key, no timing at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import triton

TUNE_ENV = "GPT_FLASH_TUNE"
TUNE_MODES = ("full", "quick")
# An H100 gives one program (CTA) at most 227 KiB of shared memory; Triton needs some for
# its own barriers and layout conversions, so the estimate must stay under this.
SHARED_MEMORY_BUDGET = 200 * 1024


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
    """The (rows, D) tiles of the input dtype one program keeps in shared memory: held
    once, streamed once per pipeline stage (forward: Q held, K and V streamed: 1 and 2)."""

    held_tiles: int
    streamed_tiles: int

    def shared_bytes(self, tile: Tile, block_d: int, elem_bytes: int) -> int:
        rows = self.held_tiles * tile.held + self.streamed_tiles * tile.streamed * tile.stages
        return rows * block_d * elem_bytes


def configs(
    tiles: Sequence[Tile], holds_queries: bool, pre_hook: Callable | None = None
) -> list[triton.Config]:
    """triton.Config objects, duplicates dropped; BLOCK_M counts query rows and BLOCK_N key
    rows in every kernel, so a kernel that holds keys (dK/dV) gets its held side as BLOCK_N."""
    out = []
    for t in dict.fromkeys(tiles):
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
    rank: Callable[[Tile, dict], tuple] | None = None,
    **kwargs,
) -> list[triton.Config]:
    """Triton's ``early_config_prune``: the candidates that pass ``keep`` and fit in shared
    memory for this call's head dim and dtype, in table order (or by ``rank``, lowest
    first); only the first in quick mode.

    Never empty: if nothing fits, the kept candidate with the smallest footprint stays, and
    the compiler has the last word."""
    args = {**named_args, **kwargs}
    block_d, elem = args["BLOCK_D"], args["Q"].element_size()
    tiles = {c: tile_of(c, holds_queries) for c in candidates}
    allowed = [c for c in candidates if keep is None or keep(tiles[c], args)] or candidates
    survivors = [
        c
        for c in allowed
        if footprint.shared_bytes(tiles[c], block_d, elem) <= SHARED_MEMORY_BUDGET
    ]
    if not survivors:
        survivors = [min(allowed, key=lambda c: footprint.shared_bytes(tiles[c], block_d, elem))]
    if rank is not None:
        survivors.sort(key=lambda c: rank(tiles[c], args))
    return survivors[:1] if tune_mode() == "quick" else survivors
