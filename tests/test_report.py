"""gpt.report: the unigram baseline against a count done by hand, and the run summary."""

import json
import math
from collections import Counter

import pytest

from gpt.data.prepare import prepare
from gpt.data.shards import open_split
from gpt.data.tokenizer import get_tokenizer
from gpt.report import main, unigram_loss


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


def test_report_prints_losses_and_writes_the_plot(data_dir, tmp_path, capsys):
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
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "is " in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main([str(run)])
    assert "metrics.jsonl is empty: the run has not logged a step yet" in capsys.readouterr().err
