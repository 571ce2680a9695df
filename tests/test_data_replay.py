"""gpt/data/replay.py: a fraction f of every batch from a second data set. Global sequence k
comes from the replay set, as its sequence r(k) = floor(k f), exactly when r(k + 1) > r(k),
and from the domain set, as its sequence k - r(k), otherwise: checked sequence by sequence
on two corpora whose tokens never overlap, for several fractions and world sizes; the
state round-trips through JSON and resumes exactly, on any world size."""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from gpt.data.loader import TokenLoader
from gpt.data.prepare import prepare
from gpt.data.replay import ReplayLoader

BLOCK = 8
GLOBAL = 6  # sequences per step over every rank
WORLDS = [1, 2, 3]


def corpus(root, alphabet: str, seed: int):
    docs = root / "docs"
    docs.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(8):
        (docs / f"d{i}.txt").write_text("".join(rng.choice(list(alphabet), 200)))
    prepare([str(docs)], root / "data", encoding="bytes", val_fraction=0.0, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """(domain, replay): letters and digits, so every token tells which set it came from."""
    root = tmp_path_factory.mktemp("replay")
    return corpus(root / "domain", "abcdefghij", 0), corpus(root / "replay", "0123456789", 1)


def loader(path, world=1, rank=0, mb=None, **kw) -> TokenLoader:
    return TokenLoader(
        path, "train", BLOCK, mb or GLOBAL // world, rank=rank, world_size=world, seed=5, **kw
    )


def mixed(sets, fraction, world=1, rank=0) -> ReplayLoader:
    domain, replay = sets
    return ReplayLoader(loader(domain, world, rank), loader(replay, world, rank), fraction)


def global_batches(sets, fraction, world, steps) -> list[torch.Tensor]:
    """(GLOBAL, BLOCK + 1) per step: every rank's sequences in rank order, x with y's last."""
    ranks = [mixed(sets, fraction, world, r) for r in range(world)]
    out = []
    for _ in range(steps):
        out.append(
            torch.cat([torch.cat(m.next_batch(), dim=1)[:, [*range(BLOCK), -1]] for m in ranks])
        )
    return out


def is_replay(rows: torch.Tensor) -> list[bool]:
    """Per row: digits only (the replay set) or letters only (the domain set), the document
    separator aside."""
    digits = ((rows >= ord("0")) & (rows <= ord("9"))).any(dim=1)
    letters = ((rows >= ord("a")) & (rows <= ord("j"))).any(dim=1)
    assert not (digits & letters).any(), "a sequence mixes the two sets"
    return digits.tolist()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.3, 0.5, 0.9])
def test_each_sequence_comes_from_where_the_fraction_says(sets, fraction, world):
    """0.3 is not a binary fraction: float arithmetic would give 2 in the first 10, not 3."""
    f = Fraction(str(fraction))
    domain, replay = (loader(p) for p in sets)
    batches = global_batches(sets, fraction, world, steps=10)
    rows = torch.cat(batches)  # global sequences 0, 1, ..., 59
    origin = is_replay(rows)
    for k in range(len(rows)):
        r = int(k * f)  # floor for k >= 0
        from_replay = int((k + 1) * f) > r
        assert origin[k] == from_replay, k
        source, number = (replay, r) if from_replay else (domain, k - r)
        assert torch.equal(rows[k], torch.from_numpy(source.sequences(np.array([number])))[0]), k
    for n in range(len(rows) + 1):
        assert sum(origin[:n]) == int(n * f), n  # exactly floor(n f) in the first n


def test_counts_by_hand(sets):
    """The first 60 sequences at f = 0.1 hold 6 replayed ones, at sequences 9, 19, ..., 59;
    at f = 1/4 15, every fourth."""
    for fraction, expected in [(0.1, [9, 19, 29, 39, 49, 59]), (0.25, list(range(3, 60, 4)))]:
        one = mixed(sets, fraction)
        origin, replayed = [], 0
        for _ in range(10):
            origin += is_replay(torch.cat(one.next_batch(), dim=1))
            replayed += one.last_replayed
        assert [k for k, r in enumerate(origin) if r] == expected
        assert replayed == len(expected)


@pytest.mark.parametrize("world", WORLDS[1:])
def test_the_global_batches_do_not_depend_on_the_world_size(sets, world):
    one = global_batches(sets, 0.3, 1, steps=8)
    many = global_batches(sets, 0.3, world, steps=8)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize("then, now", [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_a_saved_state_resumes_exactly_on_any_world_size(sets, then, now):
    straight = global_batches(sets, 0.25, 1, steps=12)
    before = [mixed(sets, 0.25, then, r) for r in range(then)]
    for _ in range(5):
        for m in before:
            m.next_batch()
    state = json.loads(json.dumps(before[0].state_dict()))  # what a checkpoint holds
    assert state["position"] == 5 * GLOBAL and state["fraction"] == "1/4"
    after = [mixed(sets, 0.25, now, r) for r in range(now)]
    for m in after:
        m.load_state_dict(state)
    for step in range(5, 12):
        got = torch.cat([torch.cat(m.next_batch(), dim=1)[:, [*range(BLOCK), -1]] for m in after])
        assert torch.equal(got, straight[step]), step
    after[0].reset()
    assert after[0].position == 0


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_a_fraction_outside_0_1_is_refused(sets, fraction):
    with pytest.raises(ValueError, match=rf"replay_fraction must be in \[0, 1\), got {fraction}"):
        mixed(sets, fraction)


@pytest.mark.parametrize(
    "other, key",
    [
        (dict(mb=2), "micro_batch_size = 2 differs from the domain loader's 6"),
        (dict(world=2, mb=6), "world_size = 2 differs from the domain loader's 1"),
        (dict(world=2, rank=1, mb=6), "rank = 1 differs from the domain loader's 0"),
    ],
)
def test_loaders_of_another_geometry_are_refused(sets, other, key):
    domain, replay = sets
    with pytest.raises(ValueError, match=f"replay loader {key}"):
        ReplayLoader(loader(domain), loader(replay, **other), 0.1)
    shorter = TokenLoader(replay, "train", BLOCK - 1, GLOBAL, seed=5)
    with pytest.raises(ValueError, match="replay loader block_size = 7 differs from the domain"):
        ReplayLoader(loader(domain), shorter, 0.1)


def test_a_state_of_another_fraction_or_position_is_refused(sets):
    state = mixed(sets, 0.1).state_dict()
    with pytest.raises(ValueError, match="replay fraction 1/10, this run has 1/5; they must match"):
        mixed(sets, 0.2).load_state_dict(state)
    for position in (-1, "6", None):
        with pytest.raises(ValueError, match="position must be an integer >= 0"):
            mixed(sets, 0.1).load_state_dict({**state, "position": position})
    with pytest.raises(ValueError, match="seed"):  # the domain loader's own check
        mixed(sets, 0.1).load_state_dict({**state, "domain": {**state["domain"], "seed": 6}})
