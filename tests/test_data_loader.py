"""Tests for gpt.data.loader: windows, rank invariance, sequential coverage, resume, errors."""

import json

import numpy as np
import pytest
import torch

from gpt.data.loader import TokenLoader
from gpt.data.prepare import prepare

T = 8  # block_size


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(1)
    for i in range(30):
        text = "".join(rng.choice(list("abcdefgh ij\n"), size=int(rng.integers(5, 60))))
        (root / f"{i:02d}.txt").write_text(text)
    # 37-token shards: most windows of 9 tokens lie in one shard, many straddle two.
    prepare([str(root / "*.txt")], root / "out", "bytes", 0.2, 37, 1, progress=False)
    return root / "out"


def reference_stream(data_dir, split):
    """The split's tokens, read straight from the documented format (not via the loader)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    parts = [
        np.frombuffer((data_dir / e["file"]).read_bytes()[64:], dtype="<u2")
        for e in manifest["splits"][split]["shards"]
    ]
    return np.concatenate(parts).astype(np.int64)


def loaders(data_dir, world, micro, mode, split="train", seed=0):
    return [
        TokenLoader(data_dir, split, T, micro, rank=r, world_size=world, seed=seed, mode=mode)
        for r in range(world)
    ]


def test_batches_are_windows_of_the_stream(data_dir):
    stream = reference_stream(data_dir, "train")
    for mode in ("random", "sequential"):
        loader = TokenLoader(data_dir, "train", T, 4, mode=mode)
        assert loader.n_tokens == len(stream) and len(loader._shards) > 5
        for _ in range(30):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
                # Each row must occur in the stream at some start (found independently).
                starts = [s for s in range(len(stream) - T) if (stream[s : s + T] == row_x).all()]
                assert any((stream[s + 1 : s + T + 1] == row_y).all() for s in starts)
    seq = TokenLoader(data_dir, "train", T, 3, mode="sequential")
    x, _ = seq.next_batch()
    assert torch.equal(x, torch.from_numpy(stream[: 3 * T].reshape(3, T)))


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_together_equal_one_rank(data_dir, mode, world):
    # N ranks of micro-batch 2 see exactly what one rank of micro-batch 2N sees, step by step.
    single = TokenLoader(data_dir, "train", T, 2 * world, mode=mode, seed=5)
    ranks = loaders(data_dir, world, 2, mode, seed=5)
    for _ in range(25):
        xs, ys = zip(*(loader.next_batch() for loader in ranks), strict=True)
        x, y = single.next_batch()
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sequential_ranks_are_disjoint_and_cover_the_split(data_dir, world):
    stream = reference_stream(data_dir, "train")
    ranks = loaders(data_dir, world, 2, "sequential")
    n = ranks[0].n_windows
    assert n == (len(stream) - 1) // T and n % (2 * world) != 0, "epoch must end mid-batch"
    seen = []  # (global index, window start)
    for step in range(n // (2 * world) + 2):
        for r, loader in enumerate(ranks):
            x, _ = loader.next_batch()
            for i, row in enumerate(x.numpy()):
                k = step * 2 * world + r * 2 + i
                seen.append((k, row))
    epoch0 = sorted((k, row) for k, row in seen if k < n)
    assert [k for k, _ in epoch0] == list(range(n))  # each window once, no rank overlap
    # Window k is tokens [kT, kT + T): every token but the ragged tail is an input once.
    assert np.array_equal(np.concatenate([row for _, row in epoch0]), stream[: n * T])
    assert len(stream) - 1 - n * T == (len(stream) - 1) % T < T
    # The next epoch starts over from the first window, and the counter says so.
    assert dict((k, row.tobytes()) for k, row in seen)[n] == stream[:T].tobytes()
    assert all(loader.epoch == 1 for loader in ranks)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_gives_identical_batches(data_dir, mode):
    def make():
        return TokenLoader(data_dir, "train", T, 5, grad_accum=2, mode=mode, seed=3)

    ref = make()
    batches, epochs = [], []
    for _ in range(48):
        epochs.append(ref.epoch)
        batches.append(ref.next_batch())
    crossed = False
    for stop in range(0, 40, 3):
        run = make()
        for _ in range(stop):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        for i in range(stop, stop + 8):
            x, y = resumed.next_batch()
            assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1]), (stop, i)
        crossed |= epochs[stop] != epochs[stop + 8]
    assert set(state) == {"version", "split", "mode", "seed", "block_size", "position", "epoch"}
    starts, bounds = ref._starts_of(np.arange(48 * 5))[:, None], ref._starts[1:-1]
    assert ((starts < bounds) & (bounds <= starts + T)).any(), "windows must straddle shards"
    if mode == "sequential":
        assert crossed, "some resumed run must cross an epoch boundary"


def test_resume_on_a_different_world_size(data_dir):
    one = TokenLoader(data_dir, "train", T, 4, mode="random", seed=9)
    for _ in range(3):
        one.next_batch()
    two = loaders(data_dir, 2, 2, "random", seed=9)
    for loader in two:
        loader.load_state_dict(one.state_dict())
    for _ in range(8):
        x, _ = one.next_batch()
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in two]), x)


def test_seed_and_val_reset(data_dir):
    a, b = (TokenLoader(data_dir, "train", T, 4, seed=s) for s in (1, 2))
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    val = TokenLoader(data_dir, "val", T, 2, mode="sequential")
    first = [val.next_batch()[0] for _ in range(3)]
    val.reset()
    assert all(torch.equal(x, val.next_batch()[0]) for x in first)
    stream = reference_stream(data_dir, "val")
    assert torch.equal(first[0], torch.from_numpy(stream[: 2 * T].reshape(2, T)))


def test_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"manifest.json: data encoded with 'bytes', the model"):
        TokenLoader(data_dir, "train", T, 2, encoding="gpt2")
    with pytest.raises(ValueError, match="257 tokens, more than the model's vocab_size 256"):
        TokenLoader(data_dir, "train", T, 2, vocab_size=256)
    with pytest.raises(ValueError, match=r"split 'val' has \d+ tokens, fewer than block_size"):
        TokenLoader(data_dir, "val", 100_000, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        TokenLoader(data_dir, "train", T, 2, mode="shuffle")
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TokenLoader(data_dir, "train", T, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        TokenLoader(data_dir, "train", 0, 2)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'manifest.json'} not found"):
        TokenLoader(tmp_path, "train", T, 2)
    loader = TokenLoader(data_dir, "train", T, 2, seed=1)
    state = TokenLoader(data_dir, "train", T, 2, seed=2).state_dict()
    with pytest.raises(ValueError, match="seed=2 but this loader has seed=1"):
        loader.load_state_dict(state)


def test_bad_shard_is_caught_when_opened(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / "train_000003.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=rf"{shard}: file is \d+ bytes, expected"):
        TokenLoader(copy, "train", T, 2)


MANY_SHARDS = """
import os, resource, sys
import numpy as np
import torch
from gpt.data.loader import TokenLoader

data_dir, reference = sys.argv[1], np.load(sys.argv[2])
open_now = len(os.listdir("/proc/self/fd"))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 80, hard))  # far fewer than the shards
loader = TokenLoader(data_dir, "train", 8, 4, mode="sequential")
windows = []
for _ in range(-(-loader.n_windows // 4)):  # one epoch: every window, every shard, in order
    x, y = loader.next_batch()
    windows.append(x)
x = torch.cat(windows)[: loader.n_windows].reshape(-1).numpy()
assert (x == reference[: len(x)]).all(), "the stream differs from the shards"
random = TokenLoader(data_dir, "train", 8, 64, seed=1)
for _ in range(20):
    random.next_batch()
print(len(loader._shards), len(os.listdir("/proc/self/fd")) - open_now)
"""


def test_more_shards_than_the_open_file_limit(tmp_path):
    """A split of about 300 shards read by two loaders with RLIMIT_NOFILE 80 above what the
    process has open: a loader keeps at most MAX_OPEN_SHARDS maps (each holds a descriptor)
    open at a time, where it used to map every shard at once and fail with EMFILE."""
    import os
    import subprocess
    import sys

    (tmp_path / "doc.txt").write_text("shards of a corpus cut very small " * 300)
    prepare([str(tmp_path / "doc.txt")], tmp_path / "out", "bytes", 0.0, 34, 1, progress=False)
    np.save(tmp_path / "stream.npy", reference_stream(tmp_path / "out", "train"))
    done = subprocess.run(
        [sys.executable, "-c", MANY_SHARDS, str(tmp_path / "out"), str(tmp_path / "stream.npy")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shards, still_open = map(int, done.stdout.split())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert shards == len(manifest["splits"]["train"]["shards"]) > 200

    from gpt.data.loader import MAX_OPEN_SHARDS

    assert still_open <= 2 * MAX_OPEN_SHARDS  # two loaders


def test_prepare_warns_about_very_small_shards(tmp_path, capsys):
    from gpt.data.prepare import SMALL_SHARD_TOKENS, main

    (tmp_path / "doc.txt").write_text("a tiny corpus " * 20)
    main([str(tmp_path / "doc.txt"), "--out", str(tmp_path / "a"), "--encoding", "bytes",
          "--shard-tokens", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: --shard-tokens 1 is small: each shard is a file" in err
    assert f"use at least {SMALL_SHARD_TOKENS:,}" in err
    main([str(tmp_path / "doc.txt"), "--out", str(tmp_path / "b"), "--encoding", "bytes"])
    assert "warning" not in capsys.readouterr().err


def test_a_shard_replaced_during_the_run_is_refused_when_reopened(tmp_path, monkeypatch):
    """Shards are re-opened after eviction: one prepared again meanwhile is named, never read
    as if it were the shard checked at start-up."""
    from gpt.data import loader as loader_module

    monkeypatch.setattr(loader_module, "MAX_OPEN_SHARDS", 1)
    (tmp_path / "doc.txt").write_text("shards of a corpus cut very small " * 40)
    prepare([str(tmp_path / "doc.txt")], tmp_path / "out", "bytes", 0.0, 200, 1, progress=False)
    loader = TokenLoader(tmp_path / "out", "train", 8, 2, mode="sequential")
    for _ in range(3):
        loader.next_batch()
    first = sorted((tmp_path / "out").glob("*.bin"))[0]
    data = first.read_bytes()
    first.unlink()
    first.write_bytes(data)  # the same bytes, another file
    with pytest.raises(ValueError, match=rf"{first.name}: the shard changed since"):
        for _ in range(200):
            loader.next_batch()
