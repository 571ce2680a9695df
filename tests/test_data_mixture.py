"""gpt/data/mixture.py: weighted mixtures of prepared data sets.

The accounting is checked against its statement, computed another way (exact fractions):
every prefix of n sequences holds floor(n p_i) or ceil(n p_i) of source i, for hand-picked,
exhaustive small and random weights. The loaders are checked on three corpora whose
alphabets never overlap, so every sequence tells which source it came from: the same global
stream for world sizes 1-4 and any micro-batch x grad_accum split, exact counts for every
prefix, exact resume on the same and on another world size, a small source starting new
epochs. Then the config's checks, the resume policy, the report's baseline, and one short
train.py run that resumes exactly. (Replay, the two-source mixture: test_data_replay.py.)"""

import itertools
import json
import math
import random
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from runs import copy_run_at, losses, records

from gpt.cli import train
from gpt.config import ConfigError
from gpt.config_io import load_config
from gpt.data.loader import TokenLoader
from gpt.data.mixture import MixtureLoader, MixtureSchedule, exact_weights
from gpt.data.prepare import prepare
from gpt.data.replay import ReplayLoader
from gpt.data.run_data import check_run_data, read_manifests
from gpt.eval.baseline import mixture_unigram_loss, token_counts, unigram_loss
from gpt.report import main as report
from gpt.train.checkpointer import check_resume, data_fingerprint

BLOCK = 8
GLOBAL = 12  # sequences per step over every rank
ALPHABETS = {"web": "abcdefghij", "code": "0123456789", "books": "KLMNOPQRST"}
WEIGHTS = {"web": 0.5, "code": 0.3, "books": 0.2}


def stream_of(weights: list, n: int) -> list[int]:
    """The source of each of the first n global sequences."""
    schedule = MixtureSchedule(list(exact_weights(dict(enumerate(weights))).values()))
    return schedule.assign(0, [0] * len(weights), n)[0].tolist()


def assert_quota(origin: list[int], weights: list) -> None:
    """Every prefix n holds floor(n p_i) or ceil(n p_i) of source i, the first source
    ceil(n p_0); computed with Fractions, not the schedule's integers."""
    total = sum(Fraction(str(w)) for w in weights)
    shares = [Fraction(str(w)) / total for w in weights]
    counts = [0] * len(weights)
    for n, source in enumerate(origin, 1):
        counts[source] += 1
        for i, (c, p) in enumerate(zip(counts, shares, strict=True)):
            assert math.floor(n * p) <= c <= math.ceil(n * p), (weights, n, i, counts)
        assert counts[0] == math.ceil(n * shares[0]), (weights, n)


# -- the accounting ----------------------------------------------------------------------------


def test_the_documented_example_by_hand():
    """0.7 / 0.2 / 0.1: web web web code web web code web web books, repeated every 10; the
    weights are relative, so 7 / 2 / 1 is the same mixture."""
    pattern = [0, 0, 0, 1, 0, 0, 1, 0, 0, 2]
    assert stream_of([0.7, 0.2, 0.1], 30) == pattern * 3
    assert stream_of([7, 2, 1], 30) == pattern * 3
    assert stream_of([1, 1, 1], 6) == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "weights",
    [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [1, 1], [0.9, 0.1], [1, 2], [0.01, 0.99], [50, 49, 1],
     [1, 1, 1, 1, 1, 1, 100], [100, 1, 1, 1, 1, 1, 1], [1, 2, 4, 8, 16, 32, 64],
     [0.333, 0.333, 0.334], [3, 1, 1, 1, 1, 1, 1], [0.123, 0.456, 0.421]],
)  # fmt: skip
def test_every_prefix_holds_floor_or_ceil_of_each_share(weights):
    assert_quota(stream_of(weights, 3000), weights)


def test_every_prefix_holds_its_share_for_every_small_integer_weighting():
    """Exhaustive over three sources with weights 1..6 and four with 1..4, over two periods."""
    for m, top in ((3, 6), (4, 4)):
        for weights in itertools.product(range(1, top + 1), repeat=m):
            assert_quota(stream_of(list(weights), 2 * sum(weights)), list(weights))


def test_every_prefix_holds_its_share_for_random_weightings():
    rng = random.Random(0)
    for _ in range(60):
        weights = [round(rng.uniform(0.01, 1), rng.randint(1, 3)) for _ in range(rng.randint(2, 7))]
        assert_quota(stream_of(weights, 1500), weights)


def test_any_window_holds_its_share_within_one_more():
    """Sequences a .. a + n - 1 hold between floor(n p) - 1 and ceil(n p) + 1 of each source."""
    weights = [0.5, 0.3, 0.2]
    origin = np.array(stream_of(weights, 400))
    for i, p in enumerate(Fraction(str(w)) for w in weights):
        hits = np.concatenate([[0], np.cumsum(origin == i)])
        for n in range(1, 60):
            window = hits[n:] - hits[:-n]
            assert window.min() >= math.floor(n * p) - 1 and window.max() <= math.ceil(n * p) + 1


@pytest.mark.parametrize("fraction", ["0.1", "0.25", "0.3", "0.45", "0.6", "0.9"])
def test_two_sources_are_replays_rule(fraction):
    """The second of two sources takes sequence k exactly when floor((k+1) f) > floor(k f)."""
    f = Fraction(fraction)
    expected = [int(math.floor((k + 1) * f) > math.floor(k * f)) for k in range(200)]
    assert stream_of([1 - f, f], 200) == expected


def test_the_pattern_repeats_every_common_denominator():
    origin = stream_of([0.5, 0.3, 0.2], 50)
    assert origin[:10] == origin[10:20] == origin[40:50]


@pytest.mark.parametrize(
    "weights, message",
    [({"a": -1}, "weight of 'a' is -1: it must be >= 0"),
     ({"a": float("nan")}, "weight of 'a' is nan: it must be a finite number"),
     ({"a": 0, "b": 0.0}, "have no weight above 0")],
)  # fmt: skip
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        exact_weights(weights)


# -- the loader --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three data sets whose tokens never overlap, with validation splits; "books" is small
    (about 20 windows), so it runs through epochs fast."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for seed, (name, alphabet) in enumerate(ALPHABETS.items()):
        docs = root / name / "docs"
        docs.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        size = 40 if name == "books" else 300
        for i in range(8):
            (docs / f"d{i}.txt").write_text("".join(rng.choice(list(alphabet), size)))
        prepare([str(docs)], root / name / "data", encoding="bytes", val_fraction=0.25,
                progress=False)  # fmt: skip
        out[name] = root / name / "data"
    return out


def mixed(sets, world=1, rank=0, micro=None, weights=WEIGHTS, mode="random") -> MixtureLoader:
    micro = micro or GLOBAL // world
    loaders = {
        name: TokenLoader(
            sets[name], "train", BLOCK, micro, rank=rank, world_size=world, seed=5, mode=mode
        )
        for name in weights
    }
    return MixtureLoader(loaders, weights)


def global_rows(ranks: list[MixtureLoader], calls: int) -> torch.Tensor:
    """(calls x micro x world, BLOCK + 1): every rank's sequences in rank order, call by call."""
    rows = []
    for _ in range(calls):
        rows += [torch.cat([x, y[:, -1:]], dim=1) for x, y in (m.next_batch() for m in ranks)]
    return torch.cat(rows)


def origin_of(rows: torch.Tensor) -> list[str]:
    """Each row's source, read from its tokens (the end-of-text token aside)."""
    names = []
    for row in rows.tolist():
        found = {n for n, a in ALPHABETS.items() for t in row if t < 256 and chr(t) in a}
        assert len(found) == 1, f"a sequence mixes sources: {found}"
        names.append(found.pop())
    return names


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_prefix_of_the_loaded_stream_holds_the_exact_counts(sets, world):
    ranks = [mixed(sets, world, r) for r in range(world)]
    origin = origin_of(global_rows(ranks, 10))
    assert_quota([list(WEIGHTS).index(n) for n in origin], list(WEIGHTS.values()))
    assert ranks[0].counts == {n: origin.count(n) for n in WEIGHTS} == {
        "web": 60, "code": 36, "books": 24
    }  # fmt: skip


@pytest.mark.parametrize(
    "world, micro", [(1, 12), (1, 1), (1, 5), (2, 6), (2, 3), (3, 4), (3, 1), (4, 3), (4, 1)]
)
def test_the_global_stream_is_the_same_for_every_world_size_and_split(sets, world, micro):
    """micro x grad_accum x world = 12 per step (micro 5: no split of 12, the stream still
    matches); each sequence is its source's sequence number = how many it gave before."""
    reference = mixed(sets)
    expected = global_rows([reference], 5)  # 60 sequences
    ranks = [mixed(sets, world, r, micro) for r in range(world)]
    got = global_rows(ranks, -(-60 // (micro * world)))[:60]
    assert torch.equal(got, expected)
    seen = dict.fromkeys(WEIGHTS, 0)
    for row, name in zip(expected, origin_of(expected), strict=True):
        own = reference.loaders[name].sequences(np.array([seen[name]]))[0]
        assert torch.equal(row, torch.from_numpy(own))
        seen[name] += 1


@pytest.mark.parametrize("then, now", [(1, 1), (2, 2), (2, 3), (3, 2), (4, 1), (1, 4)])
def test_a_saved_state_resumes_exactly_on_any_world_size(sets, then, now):
    straight = global_rows([mixed(sets)], 9)
    before = [mixed(sets, then, r) for r in range(then)]
    global_rows(before, 4)
    state = json.loads(json.dumps(before[0].state_dict()))  # what a checkpoint holds
    assert state["position"] == 4 * GLOBAL
    assert {n: s["position"] for n, s in state["sources"].items()} == before[0].counts
    assert state["weights"] == {"web": "1/2", "code": "3/10", "books": "1/5"}
    after = [mixed(sets, now, r) for r in range(now)]
    for m in after:
        m.load_state_dict(state)
    assert torch.equal(global_rows(after, 5), straight[4 * GLOBAL :])


def test_a_small_source_starts_new_epochs_instead_of_ending(sets):
    """books (sequential) has about 20 windows; after 600 sequences it has given 120, so it
    went round about six times, each epoch in the same order, and says so."""
    loader = mixed(sets, mode="sequential")
    rows = global_rows([loader], 50)
    books = loader.loaders["books"]
    assert loader.counts["books"] == 120 and books.n_windows <= 30
    assert books.epoch == 120 // books.n_windows >= 4
    progress = loader.progress()
    assert progress["epochs/books"] == pytest.approx(120 / books.n_windows)
    assert progress["tokens/books"] == 120 * BLOCK
    assert sum(v for k, v in progress.items() if k.startswith("tokens/")) == 600 * BLOCK
    ours = rows[[i for i, n in enumerate(origin_of(rows)) if n == "books"]]
    n = books.n_windows
    assert torch.equal(ours[:n], ours[n : 2 * n])  # the second epoch walks the first's windows


def test_states_of_another_mixture_or_damaged_ones_are_refused(sets):
    loader = mixed(sets)
    global_rows([loader], 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="loader state is of the mixture .*they must match"):
        mixed(sets, weights={"web": 0.6, "code": 0.2, "books": 0.2}).load_state_dict(state)
    with pytest.raises(ValueError, match="in the same order"):
        mixed(sets, weights={"code": 0.3, "web": 0.5, "books": 0.2}).load_state_dict(state)
    damaged = json.loads(json.dumps(state))
    damaged["sources"]["books"]["position"] += 1
    with pytest.raises(ValueError, match="cannot be the mixture's at position 24"):
        mixed(sets).load_state_dict(damaged)
    with pytest.raises(ValueError, match="position must be an integer >= 0"):
        mixed(sets).load_state_dict({**state, "position": -1})
    with pytest.raises(ValueError, match="seed"):  # a source's own check
        other = {**state["sources"]["web"], "seed": 6}
        mixed(sets).load_state_dict({**state, "sources": {**state["sources"], "web": other}})
    short = TokenLoader(sets["code"], "train", BLOCK, 6, seed=5)
    with pytest.raises(ValueError, match="code loader micro_batch_size = 6 differs from the web"):
        MixtureLoader({"web": mixed(sets).loaders["web"], "code": short}, {"web": 1, "code": 1})


# -- config, run data, resume ------------------------------------------------------------------


def mixture_args(sets, weights="{web = 0.5, code = 0.3, books = 0.2}", names=ALPHABETS):
    sources = ", ".join(f'{n} = "{sets[n]}"' for n in names)
    return [f"--data.mixture={weights}", f"--data.sources={{{sources}}}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.mixture={web = 0.5, code = -0.5}"], "data.mixture.code = -0.5: a weight must "
         "be a number > 0 (weights are relative"),
        (["--data.mixture={web = 1, code = 0}"], "data.mixture.code = 0: a weight must be"),
        (["--data.mixture={web = 0.7, books = 0.3}", "--data.sources={web = \"w\"}"],
         'data.mixture.books has no directory: add books = "DIR" to data.sources (it names web)'),
        (["--data.mixture={web = 1}", '--data.sources={web = "w", law = "l"}'],
         "data.sources.law is not in data.mixture: give it a weight there, or remove it"),
        (['--data.sources={web = "w"}'], "data.sources = {'web': 'w'} but data.mixture is empty"),
        (["--data.mixture={replay = 1}"], "data.mixture.replay: the name 'replay' is not valid"),
        (['--data.mixture={"a/b" = 1}'], "data.mixture.a/b: the name 'a/b' is not valid: use "
         "letters, digits"),
        (["--data.mixture={web = 1}", '--data.extra_val={web = "w"}'],
         "data.mixture.web and data.extra_val.web: a mixture's sets are evaluated"),
        (["--data.mixture={web = 1}", '--data.sources={web = "w"}', '--data.name="web"'],
         "data.name = 'web' names data.dir's "
         "validation set, which a mixture run does not read"),
        (["--data.mixture={web = 1}", '--finetune.replay_dir="r"',
          "--finetune.replay_fraction=0.1"], "finetune.replay_dir / replay_fraction and "
         "data.mixture: replay is the two-source mixture"),
    ],
)  # fmt: skip
def test_bad_mixture_configs_name_the_key_and_what_is_valid(args, message):
    cfg = load_config(None, args)
    with pytest.raises(ConfigError) as err:
        cfg.validate(1)
    assert message in str(err.value)


def test_mixture_data_sets_are_read_by_role_and_checked(sets, tmp_path):
    cfg = load_config(None, ["--model.vocab_size=257", "--model.block_size=16",
                             *mixture_args(sets)])  # fmt: skip
    cfg.validate(1)
    manifests = read_manifests(cfg)
    assert list(manifests) == ["mixture/web", "mixture/code", "mixture/books"]  # no data.dir
    check_run_data(cfg, manifests)
    tiny = dict(manifests)
    tiny["mixture/books"] = {**manifests["mixture/books"], "splits": {"train": {"tokens": 9}}}
    with pytest.raises(ConfigError, match="data.sources.books = .*split 'train' has 9 tokens"):
        check_run_data(cfg, tiny)
    other = dict(manifests)
    other["mixture/code"] = {**manifests["mixture/code"], "encoding": "gpt2"}
    with pytest.raises(ConfigError, match="data.sources.code = .* uses gpt2, but data.sources.web"):
        check_run_data(cfg, other)
    cfg.data.sources["books"] = str(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"^data.sources.books: data directory .*none does not"):
        read_manifests(cfg)


def test_resume_refuses_another_mixture_or_source(sets, tmp_path):
    cfg = load_config(None, mixture_args(sets))
    manifests = read_manifests(cfg)
    saved = {
        "config": {"model": {}, "train": {"dtype": cfg.train.dtype}},
        "world_size": 1,
        "data_fingerprint": data_fingerprint(manifests, cfg.data.mixture),
    }
    assert saved["data_fingerprint"]["mixture"] == {"web": "1/2", "code": "3/10", "books": "1/5"}
    check_resume(cfg, saved, manifests, 1, tmp_path)
    for weights in ("{web = 0.6, code = 0.2, books = 0.2}", "{code = 3, web = 5, books = 2}"):
        other = load_config(None, mixture_args(sets, weights))
        with pytest.raises(ConfigError, match=r"trained on data.mixture = \{web = 1/2, code = 3/10"
                           r", books = 1/5\}, this run on data.mixture = "):  # fmt: skip
            check_resume(other, saved, read_manifests(other), 1, tmp_path)
    same_weights = load_config(None, mixture_args(sets))
    same_weights.data.sources["code"] = str(sets["books"])
    with pytest.raises(ConfigError, match="data set changed \\(data.sources.code = "):
        check_resume(same_weights, saved, read_manifests(same_weights), 1, tmp_path)
    plain = load_config(None, [f"--data.dir={sets['web']}"])
    with pytest.raises(ConfigError, match="this run without data.mixture"):
        check_resume(plain, saved, read_manifests(plain), 1, tmp_path)


def test_the_mixtures_unigram_baseline_mixes_frequencies_at_the_shares(sets):
    """Against a count by hand; one source alone is that source's own baseline."""
    dirs, shares = {n: sets[n] for n in ("web", "code")}, {"web": 0.75, "code": 0.25}
    p = sum(
        shares[n]
        * (token_counts(d, "train", 257) + 1)
        / (token_counts(d, "train", 257).sum() + 257)
        for n, d in dirs.items()
    )
    expected = 0.0
    for n, d in dirs.items():
        val = token_counts(d, "val", 257)
        expected += shares[n] * -(val * np.log(p)).sum() / val.sum()
    assert mixture_unigram_loss(dirs, shares) == pytest.approx(expected, rel=1e-12)
    alone = mixture_unigram_loss({"web": sets["web"]}, {"web": 1})
    assert alone == pytest.approx(unigram_loss(sets["web"]), rel=1e-12)


# -- end to end --------------------------------------------------------------------------------

RUN = """
[model]
vocab_size = 257
block_size = 16
n_layer = 1
n_head = 2
n_embd = 16
[data]
mixture = {{web = 0.5, code = 0.3, books = 0.2}}
sources = {{web = "{web}", code = "{code}", books = "{books}"}}
[train]
out_dir = "{out}"
max_steps = 6
micro_batch_size = 4
grad_accum = 2
eval_interval = 3
eval_steps = 1
ckpt_interval = 3
log_interval = 1
seed = 3
wandb = false
sample_tokens = 0
[optim]
warmup_steps = 1
"""


def per_source(logged: list[dict]) -> list[dict]:
    """What a record says of the sources (tokens/, epochs/, val_loss/) by step."""
    return [{k: v for k, v in r.items() if "/" in k or k == "step"} for r in logged]


def test_a_mixture_run_logs_each_source_and_resumes_exactly(sets, tmp_path, capsys):
    """6 steps straight, and from the step-3 checkpoint: the same losses; every record
    holds tokens and epochs per source (50/30/20 of each 8-sequence step, to the count),
    evaluations the sources' losses and their weighted mean; the report lists the sources."""
    runs = {}
    for name in ("straight", "resumed"):
        path = tmp_path / f"{name}.toml"
        path.write_text(RUN.format(out=tmp_path / name, **sets))
        runs[name] = path
    assert train.main([str(runs["straight"])]) == 0
    copy_run_at(tmp_path / "straight", tmp_path / "resumed", 3)
    assert train.main([str(runs["resumed"])]) == 0
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    logged = records(tmp_path / "resumed")
    assert len(logged) == 6 and per_source(logged) == per_source(records(tmp_path / "straight"))
    for r in logged:
        n = r["tokens"] // 16  # sequences so far
        counts = {s: r[f"tokens/{s}"] // 16 for s in WEIGHTS}
        assert sum(counts.values()) == n
        assert counts["web"] == math.ceil(n / 2)
        assert math.floor(n * 0.3) <= counts["code"] <= math.ceil(n * 0.3)
        assert all(r[f"epochs/{s}"] > 0 for s in WEIGHTS)
    last = logged[-1]
    assert last["val_loss"] == pytest.approx(
        sum(w * last[f"val_loss/{s}"] for s, w in WEIGHTS.items()), rel=1e-12
    )
    capsys.readouterr()
    assert report([str(tmp_path / "resumed")]) == 0
    out = capsys.readouterr().out
    assert "tokens by source" in out
    assert re.search(r"\n    web +384 \(50\.0%, 0\.\d\d epochs\)\n    code +240 \(31\.2%", out)
    assert "validation tokens of the mixture of web, code, books" in out


def test_replay_is_the_same_stream_as_its_two_source_mixture(sets):
    """finetune.replay_fraction = 0.1 and data.mixture = {domain = 0.9, general = 0.1}."""

    def loaders():
        return {n: TokenLoader(sets[s], "train", BLOCK, 4, seed=5)
                for n, s in (("domain", "web"), ("general", "code"))}  # fmt: skip

    mixture = MixtureLoader(loaders(), {"domain": 0.9, "general": 0.1})
    replay = ReplayLoader(*loaders().values(), 0.1)
    assert torch.equal(global_rows([mixture], 30), global_rows([replay], 30))
    assert mixture.counts == {"domain": 108, "general": 12}
    assert replay.progress() == {
        k.replace("general", "replay"): v for k, v in mixture.progress().items()
    }
