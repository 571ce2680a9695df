"""Launch configurations of the attention kernels (gpt.kernels.tuning): length buckets, pruning
per head dim and dtype, quick mode, and how often a decode loop autotunes (counted, not timed:
Triton's autotuner runs for real, with its timer replaced by a counter)."""

from __future__ import annotations

import pytest
import torch

from gpt.kernels import attention_op, tuning
from gpt.kernels import flash_attention as fa
from gpt.kernels import flash_attention_packed_gqa as fp
from gpt.kernels.tuning import Tile

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (module, role) of every autotuned kernel
ROLES = [(fa, "fwd"), (fa, "dq"), (fa, "dkdv"), (fp, "fwd"), (fp, "dq"), (fp, "dkdv")]


@pytest.mark.parametrize(
    "n, bucket", [(1, 1), (2, 2), (3, 4), (17, 32), (1000, 1024), (1024, 1024), (1025, 2048)]
)
def test_length_bucket_is_next_power_of_two(n, bucket):
    assert tuning.length_bucket(n) == bucket


def test_bad_tune_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(tuning.TUNE_ENV, "fastest")
    with pytest.raises(ValueError, match="GPT_FLASH_TUNE='fastest'.*full, quick"):
        tuning.tune_mode()


def test_footprint_by_hand():
    """Forward, 128 query rows held, 64-key tiles, 3 stages, D = 128: Q 128 rows + 3 stages
    x (K + V) 64 rows = 512 rows of 128 values: 128 KiB in bf16, 256 KiB in float32 (which
    cannot fit one H100 multiprocessor, whose program limit is 227 KiB)."""
    fwd = attention_op.FOOTPRINTS["fwd"]
    tile = Tile(128, 64, 8, 3)
    assert fwd.shared_bytes(tile, 128, 2) == 128 * 1024
    assert fwd.shared_bytes(tile, 128, 4) == 256 * 1024 > tuning.SHARED_MEMORY_BUDGET


def _args(D, dtype, T=4096, group=1):
    return {"Q": torch.empty(0, dtype=dtype), "BLOCK_D": D, "T_BUCKET": T, "GROUP": group}


def _prune(module, role, args, monkeypatch):
    """The configurations the module's GPU autotuner (built as on a GPU, also here) keeps
    for a call with ``args``, through the same prune function Triton calls."""
    with monkeypatch.context() as patch:
        patch.setattr(module, "_INTERPRET", False)
        tuner = module.autotuned(module.JIT_KERNELS[role], role)
    kept = tuner.early_config_prune(tuner.configs, args)
    return [tuning.tile_of(c, role != "dkdv") for c in kept]


@pytest.mark.parametrize("module, role", ROLES, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("D", [16, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_tables_fit_and_quick_mode_keeps_the_first(module, role, D, dtype, monkeypatch):
    survivors = _prune(module, role, _args(D, dtype), monkeypatch)
    assert survivors, "pruning must leave a configuration"
    footprint = attention_op.FOOTPRINTS[role]
    fits = [footprint.shared_bytes(t, D, dtype.itemsize) <= tuning.SHARED_MEMORY_BUDGET
            for t in survivors]  # fmt: skip
    assert all(fits) or len(survivors) == 1  # else the smallest, as a last resort
    if module is fp:  # the head dim's own table, in its order (float32: smallest first)
        table = fp.GPU_TILES[role][fp._head_dim_class(D)]
        expected = [t for t in table if t in survivors]
        if dtype == torch.float32:
            expected.sort(key=lambda t: t.held * t.streamed)
        assert survivors == expected
    elif role != "dkdv":  # 3 stages compile to the same code as 2 there
        assert {t.stages for t in survivors} == {2}
    if dtype == torch.float32:  # twice the bytes of bfloat16: never more tiles fit
        assert set(survivors) <= set(_prune(module, role, _args(D, torch.bfloat16), monkeypatch))
        if module is fp and role == "fwd" and D == 128:
            assert Tile(128, 128, 8, 2) not in survivors  # 161 KiB in bf16, 322 in float32
    monkeypatch.setenv(tuning.TUNE_ENV, "quick")
    assert _prune(module, role, _args(D, dtype), monkeypatch) == survivors[:1]


@pytest.mark.parametrize("role", ["fwd", "dq"])
def test_packed_gqa_decode_calls_get_only_the_decode_tiles(role, monkeypatch):
    for T, group in [(1, 1), (1, 8), (4, 4), (16, 1)]:  # at most 16 packed rows
        survivors = _prune(fp, role, _args(64, torch.bfloat16, T=T, group=group), monkeypatch)
        assert survivors == fp.DECODE_TILES[role]
    survivors = _prune(fp, role, _args(64, torch.bfloat16, T=32, group=1), monkeypatch)
    assert survivors and all(t.held > fp.DECODE_ROWS for t in survivors)


# --------------------------------------------------------------------------------------
# How many times a decode loop autotunes
# --------------------------------------------------------------------------------------


class CountingTimer:
    """Stands in for Triton's benchmark timer: counts the configurations timed; runs none."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel_call, quantiles):
        self.calls += 1
        return [1.0, 1.0, 1.0]


def _decode(attention: str, prompt: int, new_tokens: int) -> None:
    from gpt import GPT, ModelConfig
    from gpt.generate import decode

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                      dropout=0.0, attention=attention)  # fmt: skip
    model = GPT(cfg).eval()
    idx = torch.randint(0, 32, (1, prompt))
    for _ in decode(model, idx, new_tokens, temperature=0.0):
        pass


def test_triton_decode_autotunes_once_per_length_bucket(monkeypatch):
    """The `triton` forward, autotuned over two configurations, in a decode loop of 20
    tokens after a 3-token prompt: one search for the prefill and one per power-of-two
    bucket of the key length S (4, 8, 16, 32), not one per token as an exact-S key would."""
    timer = CountingTimer()
    tiles = [Tile(32, 16, 4, 2), Tile(16, 16, 4, 2)]
    kernel = fa.autotuned(fa.JIT_KERNELS["fwd"], "fwd", tiles=tiles, do_bench=timer)
    monkeypatch.setitem(fa.TUNED_KERNELS, "fwd", kernel)
    _decode("triton", prompt=3, new_tokens=20)
    # prefill (T = S = 3) then decoding steps with S = 4 .. 22 (the last token is not fed back)
    searches = 1 + len({tuning.length_bucket(S) for S in range(4, 23)})
    assert searches == 5 and len(kernel.cache) == searches
    assert timer.calls == len(tiles) * searches


def test_triton_packed_gqa_decode_never_autotunes(monkeypatch):
    """The `triton-packed-gqa` forward: the 24-row prefill (12 tokens x 2 heads per group) is
    tuned once; the decode steps (2 packed rows) take the one decode tile, never timed."""
    timer = CountingTimer()
    tiles = [Tile(32, 16, 4, 2), Tile(64, 16, 4, 2), Tile(fp.DECODE_ROWS, 16, 4, 2)]
    kernel = fp.autotuned(fp.JIT_KERNELS["fwd"], "fwd", tiles=tiles, do_bench=timer)
    monkeypatch.setitem(fp.TUNED_KERNELS, "fwd", kernel)
    _decode("triton-packed-gqa", prompt=12, new_tokens=20)
    assert timer.calls == 2  # the prefill's two non-decode tiles, once
    decode_keys = [key for key in kernel.cache if key[0] == 1]
    assert len(decode_keys) == len({tuning.length_bucket(S) for S in range(13, 32)})
    assert all(kernel.cache[key].kwargs["BLOCK_M"] == fp.DECODE_ROWS for key in decode_keys)
