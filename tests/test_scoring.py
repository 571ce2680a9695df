"""In-context evaluation on a bigram "model" whose probabilities are written by hand, so that
every log-likelihood, prediction and accuracy can be worked out on paper."""

import json
import math

import pytest
import torch

from gpt import ModelConfig
from gpt.data.tokenizer import get_tokenizer
from gpt.eval.scoring import continuation_logprobs, encode_pair, evaluate_task, format_summary
from gpt.eval.tasks import load_task

BYTES = get_tokenizer("bytes")


class Bigram(torch.nn.Module):
    """logits[b, t] = log P[idx[b, t]]: the next token depends on the current one only."""

    def __init__(self, probs: torch.Tensor, block_size: int = 64):
        super().__init__()
        V = probs.shape[0]
        self.cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=2)
        self.log_p = torch.nn.Parameter(probs.double().log())

    def forward(self, idx, targets=None, kv_cache=None):
        if kv_cache is not None:  # sample_texts decodes with a cache; a bigram needs none
            kv_cache.length += idx.shape[1]
        return self.log_p[idx]


P4 = torch.tensor(
    [
        [0.5, 0.25, 0.125, 0.125],
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.2, 0.3, 0.4],
        [0.7, 0.1, 0.1, 0.1],
    ]
)


def test_hand_computed_log_likelihoods_batched_and_truncated():
    model = Bigram(P4, block_size=4)
    pairs = [([0], [2, 3]), ([3, 1], [0]), ([1, 2, 3, 0, 1], [1, 1])]
    expected = [
        math.log(0.125) + math.log(0.4),  # p(2 | 0) p(3 | 2)
        math.log(0.25),  # p(0 | 1)
        math.log(0.25) + math.log(0.25),  # p(1 | 1) p(1 | 1): only the last 5 tokens fit
    ]
    for batch_size in (1, 2, 3):
        got = continuation_logprobs(model, pairs, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-5)


def test_encode_pair_moves_trailing_spaces_and_starts_empty_contexts_at_eot():
    assert encode_pair(BYTES, "A:  ", "x") == (BYTES.encode("A:"), BYTES.encode("  x"))
    assert encode_pair(BYTES, "", "x") == ([BYTES.eot], BYTES.encode("x"))
    with pytest.raises(ValueError, match="empty continuation"):
        encode_pair(BYTES, "A:", "")


def uniform_bytes_except(cells: dict[tuple[str, str], float]) -> torch.Tensor:
    """A 257 x 257 transition table, uniform except P(next | prev) = p for each cell; the rest
    of such a row shares 1 - p."""
    probs = torch.full((257, 257), 1.0 / 257, dtype=torch.float64)
    for (prev, nxt), p in cells.items():
        row = probs[ord(prev)]
        row.fill_((1 - p) / 256)
        row[ord(nxt)] = p
    return probs


def test_multiple_choice_accuracy_and_length_normalised_accuracy(tmp_path):
    # After "A: " the choices are scored as " a" and " bb". Uniform rows give each byte
    # log(1/257); P(b | b) = 0.9. So log p(" a") = 2 log(1/257) = -11.10 beats
    # log p(" bb") = 2 log(1/257) + log 0.9 = -11.20, but per byte " bb" wins: -5.60 vs -11.10.
    model = Bigram(uniform_bytes_except({("b", "b"): 0.9}))
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"input": "?", "choices": ["a", "bb"], "answer": 1}) + "\n")
    results = evaluate_task(model, BYTES, load_task(path), progress=False)
    u = math.log(1 / 257)
    (record,) = results["records"]
    assert record["logprobs"] == pytest.approx([2 * u, 2 * u + math.log(0.9)], abs=1e-5)
    assert (record["predicted"], record["predicted_norm"]) == (0, 1)
    assert results["accuracy"] == 0.0 and results["accuracy_norm"] == 1.0
    assert results["chance"] == 0.5 and results["kind"] == "multiple_choice"
    json.dumps(results)  # serialisable as is


def test_generative_exact_match_after_stripping_with_limit(tmp_path):
    # greedy after "A: " writes "x" then a newline (the stop string)
    model = Bigram(uniform_bytes_except({(" ", "x"): 0.9, ("x", "\n"): 0.9}))
    rows = [
        {"input": "1", "target": "x"},
        {"input": "2", "target": [" y", "x "]},
        {"input": "3", "target": "y"},
        {"input": "4", "target": "x"},
    ]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_task(model, BYTES, load_task(path), shots=1, limit=3, progress=False)
    assert [r["output"] for r in results["records"]] == ["x", "x", "x"]
    assert [r["correct"] for r in results["records"]] == [True, True, False]
    assert results["examples"] == 3 and results["accuracy"] == pytest.approx(2 / 3)
    lp = results["records"][0]["target_logprob"]  # log p(" " | ":") + log p("x" | " ")
    assert lp == pytest.approx(math.log(1 / 257) + math.log(0.9), abs=1e-5)
    assert "chance" not in results
    table = format_summary(results)
    assert "gen" in table and "66.7%" in table and "generative" in table


def test_summary_table_columns():
    results = {"task": "t", "kind": "multiple_choice", "shots": 3, "examples": 10,
               "accuracy": 0.5, "accuracy_norm": 0.6, "chance": 0.25}  # fmt: skip
    head, rule, row = format_summary(results).splitlines()
    assert head.split() == ["task", "kind", "shots", "examples", "accuracy", "acc_norm", "chance"]
    assert row.split() == ["t", "multiple_choice", "3", "10", "50.0%", "60.0%", "25.0%"]
    assert set(rule.replace(" ", "")) == {"-"}


def test_evaluation_errors(tmp_path):
    model = Bigram(P4, block_size=4)
    with pytest.raises(ValueError, match=r"1\.\.4 continuation tokens \(block_size\), got 1 and 5"):
        continuation_logprobs(model, [([0], [1, 1, 1, 1, 1])])
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"input": "?", "choices": ["a", "b"], "answer": 0}) + "\n")
    task = load_task(path)
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        evaluate_task(model, BYTES, task, limit=0)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        evaluate_task(model, BYTES, task, batch_size=0)
