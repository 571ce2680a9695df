"""In-context evaluation on a bigram "model" whose probabilities are written by hand, so that
every log-likelihood, prediction and accuracy can be worked out on paper."""

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from gpt import GPT, ModelConfig
from gpt.data.tokenizer import get_tokenizer
from gpt.eval import bounded_regex
from gpt.eval.scoring import (
    continuation_logprobs,
    encode_pair,
    evaluate_task,
    format_summary,
    normalise_output,
)
from gpt.eval.tasks import Task, load_task

BYTES = get_tokenizer("bytes")


class Bigram(torch.nn.Module):
    """logits[b, t] = log P[idx[b, t]]: the next token depends on the current one only."""

    def __init__(self, probs: torch.Tensor, block_size: int = 64):
        super().__init__()
        V = probs.shape[0]
        self.cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=2)
        self.log_p = torch.nn.Parameter(probs.double().log())
        self.lm_head = torch.nn.Identity()  # scoring applies "the head" at chosen positions

    def forward(self, idx, targets=None, kv_cache=None):
        if kv_cache is not None:  # scoring and decoding use a cache; a bigram needs none
            kv_cache.length += idx.shape[1]
        return self.lm_head(self.log_p[idx])


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
    # the prompt's trailing space is the output's to write: greedy after "A:" writes " ", "x",
    # then a newline (the stop string); the moved space is not part of the answer
    model = Bigram(uniform_bytes_except({(":", " "): 0.9, (" ", "x"): 0.9, ("x", "\n"): 0.9}))
    rows = [
        {"input": "1", "target": "x"},
        {"input": "2", "target": [" y", "x "]},
        {"input": "3", "target": "y"},
        {"input": "4", "target": "x"},
    ]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_task(model, BYTES, load_task(path), shots=1, limit=3, progress=False)
    # --limit draws its queries with the seed (task files are often sorted by answer)
    chosen = sorted(random.Random("1234:queries").sample(range(4), 3))
    assert [r["index"] for r in results["records"]] == chosen
    assert [r["output"] for r in results["records"]] == ["x", "x", "x"]
    hand = {0: True, 1: True, 2: False, 3: True}  # row 1 matches "x " stripped, row 2 wants "y"
    assert [r["correct"] for r in results["records"]] == [hand[i] for i in chosen]
    expected = sum(hand[i] for i in chosen) / 3
    assert results["examples"] == 3 and results["accuracy"] == pytest.approx(expected)
    assert results["metrics"] == {"exact_str_match": pytest.approx(expected)}
    (lp,) = {r["target_logprob"] for r in results["records"] if r["targets"] == ["x"]}
    assert lp == pytest.approx(2 * math.log(0.9), abs=1e-5)  # log p(" " | ":") p("x" | " ")
    assert "chance" not in results
    table = format_summary(results)
    assert "gen" in table and f"{100 * expected:.1f}%" in table and "generative" in table


def test_summary_table_columns():
    results = {"task": "t", "kind": "multiple_choice+generative", "shots": 3, "examples": 10,
               "metrics": {"multiple_choice_grade": 0.5, "exact_str_match": 0.125},
               "chance": 0.25}  # fmt: skip
    head, rule, row, row2 = format_summary(results).splitlines()
    assert head.split() == ["task", "kind", "shots", "examples", "metric", "value", "chance"]
    assert row.split() == ["t", "multiple_choice", "3", "10", "multiple_choice_grade", "50.0%",
                           "25.0%"]  # fmt: skip
    assert row2.split() == ["t", "generative", "3", "10", "exact_str_match", "12.5%", "-"]
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
    with pytest.raises(ValueError, match="--shots 1 needs 1 examples besides the query; .*has 0"):
        evaluate_task(model, BYTES, task, shots=1)
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        evaluate_task(model, BYTES, task, batch_size=0)


def test_bigbench_grade_with_fractional_scores_and_several_right_choices(tmp_path):
    """multiple_choice_grade counts the predicted choice's target score: 1 for any of several
    right choices, the fraction itself for a fractional one; chance is the mean of
    sum(scores) / len(scores)."""
    # After "A:" every choice starts with " "; P(x | " ") = 0.5 and P(y | " ") = 0.3, the rest
    # uniform, so the one-byte choice "x" is the most likely, then "y", then "z" and "w".
    probs = uniform_bytes_except({})
    probs[ord(" ")] = 0.2 / 255
    probs[ord(" "), ord("x")], probs[ord(" "), ord("y")] = 0.5, 0.3
    model = Bigram(probs)
    examples = [
        {"input": "", "target_scores": {"w": 1, "x": 0.25, "y": 1}},  # predicts x: 0.25
        {"input": "", "target_scores": {"z": 0, "y": 1, "w": 1}},  # predicts y: 1
        {"input": "", "target_scores": {"z": 1, "x": 0, "w": 0}},  # predicts x: 0
    ]
    data = {"metrics": ["multiple_choice_grade"], "examples": examples}
    path = tmp_path / "frac" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    results = evaluate_task(model, BYTES, load_task(path), shots=2, progress=False)
    assert [r["predicted"] for r in results["records"]] == [1, 1, 1]  # x, y, x by position
    assert results["metrics"]["multiple_choice_grade"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert results["chance"] == pytest.approx((2.25 / 3 + 2 / 3 + 1 / 3) / 3)
    assert [r["correct"] for r in results["records"]] == [False, True, False]
    lp = results["records"][0]["logprobs"]  # log p(" " | ":") + log p(choice | " ")
    u = math.log(1 / 257)
    rest = math.log(0.2 / 255)
    assert lp == pytest.approx([u + rest, u + math.log(0.5), u + math.log(0.3)], abs=1e-5)


def test_several_right_choices_where_the_prediction_is_not_the_first_right_one(tmp_path):
    """A prediction is right when it is any of the right choices, wherever they are listed:
    the second or last of them, not only the first; a wrong choice listed between right
    ones is wrong (its own score, 0 or a fraction, is the grade)."""
    # as above: after "A:" the one-byte choice "x" is the most likely (0.5), then "y" (0.3)
    probs = uniform_bytes_except({})
    probs[ord(" ")] = 0.2 / 255
    probs[ord(" "), ord("x")], probs[ord(" "), ord("y")] = 0.5, 0.3
    model = Bigram(probs)
    examples = [
        {"input": "", "target_scores": {"z": 0, "w": 1, "x": 1}},  # x: the last right one
        {"input": "", "target_scores": {"z": 0, "w": 1, "x": 1, "v": 1}},  # x: 2nd of 3 right
        {"input": "", "target_scores": {"w": 1, "x": 0, "y": 1}},  # x: wrong, between right
        {"input": "", "target_scores": {"w": 1, "x": 0.5, "z": 1}},  # x: a fraction, between
    ]
    path = tmp_path / "several" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"metrics": ["multiple_choice_grade"], "examples": examples}))
    results = evaluate_task(model, BYTES, load_task(path), progress=False)
    records = results["records"]
    assert [r["answers"] for r in records] == [[1, 2], [1, 2, 3], [0, 2], [0, 2]]
    assert [r["predicted"] for r in records] == [2, 2, 1, 1]
    assert [r["correct"] for r in records] == [True, True, False, False]
    # one byte per choice: ranking per byte is the same ranking
    assert [r["predicted_norm"] for r in records] == [2, 2, 1, 1]
    assert [r["correct_norm"] for r in records] == [True, True, False, False]
    assert results["metrics"]["multiple_choice_grade"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert results["accuracy_norm"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)


@pytest.mark.parametrize(
    "stop, regex, text, expected",
    [
        (None, r"[^\.\?\!\;\n]+", "Paris. Next", "Paris"),  # BIG-bench's default regex
        (None, r"[^\.\?\!\;\n]+", "\nParis", "Paris"),  # the first match, not the start
        (".", None, "4. and more", "4."),  # cut after the stop string, which stays
        ("\n", r"[-+]?\d+", "is 42\n7", "42"),
        (None, r"('.*?')", "x 'ab' 'c'", "'ab'"),  # a group: its text, as re.findall
        (None, r"\d+", "none", ""),  # no match: an empty answer
    ],
)
def test_bigbench_output_normalisation(stop, regex, text, expected):
    task = Task(Path("t.json"), [], False, stop_string=stop, output_regex=regex)
    assert normalise_output(task, text) == expected


def test_generative_bigbench_task_uses_regex_and_exact_match(tmp_path):
    # greedy after "A:" writes " 7." then "7"s; the default regex keeps " 7"... minus the
    # moved space: "7" (exact), while a target "7." would need the stop string kept
    model = Bigram(uniform_bytes_except({(":", " "): 0.9, (" ", "7"): 0.9, ("7", "."): 0.9}))
    examples = [{"input": "3+4", "target": ["7", "seven"]}, {"input": "2+2", "target": "4"}]
    data = {"metrics": ["exact_str_match", "case_insensitive_str_match", "bleu"],
            "examples": examples}  # fmt: skip
    path = tmp_path / "arith.json"
    path.write_text(json.dumps(data))
    results = evaluate_task(model, BYTES, load_task(path), max_new_tokens=4, progress=False)
    assert [r["output"] for r in results["records"]] == ["7", "7"]
    assert results["metrics"] == {"exact_str_match": 0.5, "case_insensitive_str_match": 0.5}
    assert results["not_implemented"] == ["bleu"]


def tiny_gpt(vocab_size=61, block_size=16):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                            n_embd=16)).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def test_shared_prefix_scoring_equals_one_full_pass_per_pair():
    """The prompt run once and its cache copied per continuation equals running each
    (context + continuation) through the model alone; also past block_size and over a
    vocabulary cut to the tokenizer's ids."""
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    ctx_a, ctx_b = torch.randint(0, 61, (7,), generator=g).tolist(), [3, 4]
    long_ctx = torch.randint(0, 61, (20,), generator=g).tolist()  # past block_size 16
    pairs = [(ctx_a, [1]), (ctx_a, [5, 6, 7]), (ctx_b, [9, 9]), (ctx_a, [2, 8]),
             (long_ctx, [4, 5, 6]), (long_ctx, [7])]  # fmt: skip

    def reference(ctx, cont, vocab):
        longest = max(len(c) for x, c in pairs if x == ctx)  # the context's cut: its group's
        seq = (ctx[-(16 + 1 - longest) :] + cont)[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -len(cont) :, :vocab].double()
        return logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item()

    for vocab in (61, 40):
        expected = [reference(c, x, vocab) for c, x in pairs]
        for batch_size in (1, 2, 16):
            got = continuation_logprobs(model, pairs, batch_size, vocab_size=vocab)
            assert got == pytest.approx(expected, abs=1e-4), (vocab, batch_size)


def test_a_catastrophic_output_regex_is_bounded_and_its_examples_score_misses(
    tmp_path, monkeypatch, capsys
):
    """A task's output_regex (a+)+b on the model's 26 'a's backtracks for ~10 s per example in
    re; under the limit each example stops at it, scores a miss and is counted, with one
    warning naming the task and the pattern."""
    monkeypatch.setattr(bounded_regex, "REGEX_TIMEOUT_S", 0.3)
    model = Bigram(uniform_bytes_except({(":", "a"): 0.9, ("a", "a"): 0.9}))
    examples = [{"input": "1", "target": "a"}, {"input": "2", "target": "aa"}]
    path = tmp_path / "slow" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"examples": examples, "output_regex": "(a+)+b"}))
    task = load_task(path)
    assert task.output_regex == "(a+)+b"
    start = time.monotonic()
    results = evaluate_task(model, BYTES, task, max_new_tokens=26, progress=False)
    assert time.monotonic() - start < 2 * 0.3 + 5.0
    assert [r["raw_output"] for r in results["records"]] == ["a" * 26] * 2
    assert [(r["output"], r["regex_timeout"], r["correct"]) for r in results["records"]] == [
        (None, True, False)] * 2  # fmt: skip
    assert results["regex_timeouts"] == 2 and results["metrics"] == {"exact_str_match": 0.0}
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "warning: task slow: output_regex '(a+)+b' ran past 0.3 s on example 0" in err
    json.dumps(results, allow_nan=False)


def test_huge_finite_scores_give_finite_grades_and_chance(tmp_path):
    """sum(scores) of 1e308s overflows to inf ("inf%" in the table, Infinity in the JSON);
    the means stay finite, and a non-finite value prints as "-"."""
    model = Bigram(uniform_bytes_except({}))
    examples = [{"input": str(i), "target_scores": {"x": 1.7e308, "y": 1.6e308, "z": 0}}
                for i in range(3)]  # fmt: skip
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"metrics": ["multiple_choice_grade"], "examples": examples}))
    results = evaluate_task(model, BYTES, load_task(path), progress=False)
    assert results["chance"] == pytest.approx(1.7e308 / 3 + 1.6e308 / 3, rel=1e-12)
    assert math.isfinite(results["metrics"]["multiple_choice_grade"])
    json.dumps(results, allow_nan=False)
    row = format_summary({**results, "chance": math.inf}).splitlines()[2]
    grade = results["metrics"]["multiple_choice_grade"]
    assert row.split()[-2:] == [f"{grade:.2e}".replace("e+308", "e+310%"), "-"]
