"""gpt.report: the unigram baseline against a count done by hand, and the run summary."""

import json
import math
from collections import Counter

import pytest
from figures import drawn

from gpt.data.prepare import prepare
from gpt.data.shards import open_split
from gpt.data.tokenizer import get_tokenizer
from gpt.eval.baseline import unigram_loss
from gpt.report import main


@pytest.fixture
def data_dir(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(("to be or not " * (i + 1)) + f"doc {i} é")
    prepare([str(docs)], tmp_path / "bytes", encoding="bytes", val_fraction=0.3, progress=False)
    return tmp_path / "bytes", docs


def test_unigram_loss_matches_a_count_by_hand(data_dir):
    out, _ = data_dir
    train, val = Counter(), Counter()
    for split, counter in (("train", train), ("val", val)):
        for shard in open_split(out, split):
            counter.update(int(t) for t in shard)
    assert sum(val.values()) > 0
    n = get_tokenizer("bytes").n_vocab
    total = sum(train.values())
    expected = -sum(c * math.log((train[t] + 1) / (total + n)) for t, c in val.items())
    assert unigram_loss(out) == pytest.approx(expected / sum(val.values()), rel=1e-12)
    assert unigram_loss(out) < math.log(n)  # frequencies beat the uniform guess


def test_report_prints_losses_and_writes_the_plot(data_dir, tmp_path, capsys, saved_figures):
    out, _ = data_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'[data]\ndir = "{out}"\n')
    records = [
        {"step": 1, "tokens": 64, "loss": 5.0, "step_ms": 10.0},
        {"step": 2, "tokens": 128, "loss": 4.0, "step_ms": 10.0, "val_loss": 4.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "final validation loss  4.500 (step 2)" in text
    assert f"unigram baseline       {unigram_loss(out):.3f}" in text
    assert (run / "loss.png").is_file()
    (fig,) = saved_figures
    (ax,) = fig.axes
    baseline = unigram_loss(out)
    assert drawn(ax) == {
        "lines": [
            ("train loss", [64, 128], [5.0, 4.0]),
            ("val loss", [128], [4.5]),
            (f"unigram baseline {baseline:.2f}", [0, 1], [baseline, baseline]),
        ],
        "title": "",
        "xlabel": "tokens seen",
        "ylabel": "cross-entropy (nats/token)",
        "legend": ["train loss", "val loss", f"unigram baseline {baseline:.2f}"],
    }
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "is " in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main([str(run)])
    assert "metrics.jsonl is empty: the run has not logged a step yet" in capsys.readouterr().err


def test_report_from_another_directory_plots_every_validation_set(
    data_dir, tmp_path, monkeypatch, capsys
):
    """A fine-tuning run (data.name = domain, one extra set) with a relative data.dir, read
    from another working directory: the paths resolve against run.json's, and the domain and
    general curves are drawn once each."""
    from gpt.run import write_run_info
    from gpt.train.metrics import plot_losses

    out, _ = data_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[data]\ndir = "bytes"\nname = "domain"\n')
    monkeypatch.chdir(tmp_path)
    write_run_info(run, ["train.py"])
    records = [
        {"step": 0, "tokens": 0, "val_loss": 3.0, "val_loss/domain": 3.0, "val_loss/general": 2.0},
        {"step": 1, "tokens": 64, "loss": 2.5},
        {"step": 2, "tokens": 128, "loss": 2.2, "val_loss": 2.4, "val_loss/domain": 2.4,
         "val_loss/general": 2.3},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(run)  # elsewhere: "bytes" does not exist here
    assert main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "val_loss/general        2.300 (step 0: 2.000)" in text
    assert f"unigram baseline       {unigram_loss(out):.3f}" in text
    labels = plot_losses(run / "metrics.jsonl", tmp_path / "p.png", skip={"val_loss"})
    assert labels == ["train loss", "val loss: domain", "val loss: general"]
