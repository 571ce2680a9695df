"""In-context evaluation: score a task's examples with a few-shot prompt, as BIG-bench defines
its metrics (Srivastava et al. 2022, ``bigbench/api/task_metrics.py``; our own code).

Multiple choice: each choice's log-likelihood given the prompt, log p(choice | prompt) = sum
over the choice's tokens of log p(token | everything before it). The prediction is the most
likely choice, and ``multiple_choice_grade`` is the mean of the predicted choice's
``target_scores`` value: 1 for a right choice (any of several right ones), 0 for a wrong one,
the fraction itself for a fractional score. Its chance level is the mean over examples of
sum(scores) / len(scores). ``multiple_choice_grade_per_byte`` ranks choices by log-likelihood
per UTF-8 byte instead (lm-evaluation-harness's acc_norm; it removes the bias towards short
choices). The prompt's trailing spaces are moved to the start of each choice, so that
" Paris" is one GPT-2 token as in running text.

Generation: greedy decoding from the prompt (trailing spaces moved the same way), then the
task's normalisation: BIG-bench's output is cut after its ``stop_string`` and reduced to the
first match of its ``output_regex`` (an empty string if none; a task file's own regex runs
with a time limit, gpt.eval.bounded_regex, and an output on which it runs past the limit
scores as a miss, with a warning), and ``exact_str_match`` asks
for that string to be one of the targets exactly (``case_insensitive_str_match``: after
lower-casing and stripping both); our JSONL tasks stop at a newline and compare stripped
strings. The first target's log-likelihood is recorded too.

Speed: the prompt shared by the choices of a question is run once; its keys and values are
copied into a KV cache of one row per choice and the choices run as one batch after it
(gpt.model.KVCache.expand), and the LM head only sees the positions whose next-token
probabilities are needed.
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm import tqdm

from gpt.eval import bounded_regex
from gpt.eval.tasks import BIGBENCH_OUTPUT_REGEX, Example, Task, build_prompt, select_shots
from gpt.generate import sample_texts
from gpt.model import GPT, KVCache


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, the context's trailing spaces moved to the
    continuation; an empty context becomes the end-of-text token."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    ctx = tokenizer.encode(stripped) or [tokenizer.eot]
    cont = tokenizer.encode(continuation)
    if not cont:
        raise ValueError(f"empty continuation after context {context[-40:]!r}")
    return ctx, cont


class _HeadAt(torch.nn.Module):
    """The model's LM head applied at chosen positions only (all when ``positions`` is None):
    a prompt's other positions need no 50,257-way logits."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head, self.positions = head, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x if self.positions is None else x[:, self.positions])


@contextmanager
def _head_at(model: GPT):
    head = model.lm_head
    wrapper = _HeadAt(head)
    model.lm_head = wrapper
    try:
        yield wrapper
    finally:
        model.lm_head = head


def _log_softmax(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """log p over the ids the tokenizer can decode: a padded vocabulary's extra ids are out."""
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    return torch.log_softmax(logits, dim=-1)


def _score_group(model, head: _HeadAt, ctx: list[int], conts: list[list[int]], vocab_size):
    """log p(cont | ctx) for continuations sharing one context: the context runs once."""
    longest = max(len(c) for c in conts)
    device = next(model.parameters()).device
    cache = KVCache(model.cfg, 1, device=device, dtype=next(model.parameters()).dtype)
    head.positions = [-1]
    last = model(torch.tensor([ctx], device=device), kv_cache=cache)  # (1, 1, V)
    first = _log_softmax(last[0, -1], vocab_size).cpu()  # (V,)
    out = [first[c[0]].double().item() for c in conts]
    if longest == 1:
        return out
    head.positions = None
    idx = torch.zeros(len(conts), longest - 1, dtype=torch.long)
    targets = torch.zeros(len(conts), longest - 1, dtype=torch.long)
    for b, c in enumerate(conts):  # right padding: causal attention never looks at it
        idx[b, : len(c) - 1] = torch.tensor(c[:-1])
        targets[b, : len(c) - 1] = torch.tensor(c[1:])
    logits = model(idx.to(device), kv_cache=cache.expand(len(conts)))  # (C, L - 1, V)
    logp = _log_softmax(logits, vocab_size)
    picked = logp.gather(-1, targets.to(device)[..., None])[..., 0].double().cpu()  # (C, L - 1)
    return [out[b] + picked[b, : len(c) - 1].sum().item() for b, c in enumerate(conts)]


@torch.no_grad()
def continuation_logprobs(
    model: GPT,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    progress: bool = False,
    vocab_size: int | None = None,
) -> list[float]:
    """log p(continuation | context) in nats for each (context ids, continuation ids) pair,
    over the first ``vocab_size`` ids (default: all). Pairs with the same context share one
    run of it, their continuations batched ``batch_size`` at a time. A context that does not
    fit is cut from the left to block_size + 1 - (its longest continuation) tokens (the last
    continuation token is a target only, never an input)."""
    block = model.cfg.block_size
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont or len(cont) > block:
            raise ValueError(
                f"need a non-empty context and 1..{block} continuation tokens "
                f"(block_size), got {len(ctx)} and {len(cont)}"
            )
        groups.setdefault(tuple(ctx), []).append(i)
    longest = {ctx: max(len(pairs[i][1]) for i in members) for ctx, members in groups.items()}
    out = [0.0] * len(pairs)
    with _head_at(model) as head:
        for ctx, members in tqdm(groups.items(), disable=not progress, leave=False):
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                conts = [pairs[i][1] for i in chunk]
                cut = list(ctx[-(block + 1 - longest[ctx]) :])
                scored = _score_group(model, head, cut, conts, vocab_size)
                for i, lp in zip(chunk, scored, strict=True):
                    out[i] = lp
    return out


def query_indices(task: Task, seed: int, limit: int | None) -> list[int]:
    """The examples to score: all, or ``limit`` of them drawn by a seeded generator (as
    BIG-bench's max_examples; task files are often sorted by answer), in file order."""
    n = len(task.examples)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}:queries").sample(range(n), limit))


def prepare_prompts(task: Task, shots: int, seed: int, queries: list[int]) -> list[str]:
    """The prompt of each query; raises (before any model work) if shots cannot be drawn."""
    return [
        build_prompt(task, task.examples[i], select_shots(task, shots, seed, i)) for i in queries
    ]


def normalise_output(task: Task, text: str, timeout: float | None = None) -> str:
    """BIG-bench's post-processing: cut after the stop string, then the first regex match.
    A task file's own regex runs in a worker with a time limit (``timeout`` seconds, default
    ``bounded_regex.REGEX_TIMEOUT_S``) and raises ``bounded_regex.RegexTimeout`` past it;
    BIG-bench's default regex (linear, ours) runs here."""
    if task.stop_string:
        cut = text.find(task.stop_string)
        if cut >= 0:
            text = text[: cut + len(task.stop_string)]
    if task.output_regex == BIGBENCH_OUTPUT_REGEX:
        match = re.search(task.output_regex, text)
        return "" if match is None else match.group(0)
    if task.output_regex is not None:
        found = bounded_regex.search(task.output_regex, text, timeout)
        return "" if found is None else found
    return text


def _string_match(task: Task, metric: str, output: str, targets: list[str]) -> bool:
    if task.strip:
        return output.strip() in {t.strip() for t in targets}
    if metric == "case_insensitive_str_match":
        return output.strip().lower() in {t.strip().lower() for t in targets}
    return output in targets


def evaluate_task(
    model: GPT,
    tokenizer,
    task: Task,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    stops: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Score ``limit`` examples of ``task`` (all by default) with ``shots`` demonstrations
    each; a JSON-serialisable dict with the metrics and one record per example. ``stops``
    replaces the stop strings of generation (default: the task's; a newline for JSONL)."""
    queries = query_indices(task, seed, limit)
    prompts = prepare_prompts(task, shots, seed, queries)  # before any work: shots may not fit
    examples = [(i, task.examples[i]) for i in queries]
    return evaluate_prompts(
        model, tokenizer, task, examples, prompts, shots, seed, batch_size, max_new_tokens,
        stops, progress,
    )  # fmt: skip


def evaluate_prompts(
    model: GPT,
    tokenizer,
    task: Task,
    queries: list[tuple[int, Example]],
    prompts: list[str],
    shots: int,
    seed: int,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    stops: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """``evaluate_task`` on prompts already built: ``queries`` are (index, example) pairs
    and ``prompts`` their prompts (``task.examples`` is not read: it may be dropped)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    examples = [ex for _, ex in queries]
    generative = [m for m in task.metrics if m != "multiple_choice_grade"]
    was_training = model.training
    model.eval()
    records = [{"index": i} for i, _ in queries]
    metrics: dict[str, float] = {}
    try:
        if task.multiple_choice:
            metrics |= _score_choices(model, tokenizer, examples, prompts, batch_size, records)
        if generative:
            metrics |= _score_generation(
                model, tokenizer, task, examples, prompts, batch_size, max_new_tokens, stops,
                progress, records,
            )  # fmt: skip
    finally:
        model.train(was_training)
    kinds = ["multiple_choice"] * task.multiple_choice + ["generative"] * bool(generative)
    summary = {
        "task": task.name,
        "path": str(task.path),
        "kind": "+".join(kinds),
        "shots": shots,
        "seed": seed,
        "examples": len(records),
        "metrics": {m: metrics[m] for m in task.metrics},
        "accuracy": metrics[task.metrics[0]],  # the task's first (preferred) metric
    }
    if task.multiple_choice:
        summary["accuracy_norm"] = metrics["multiple_choice_grade_per_byte"]
        summary["chance"] = _mean([_mean(e.scores) for e in examples])
    if task.unimplemented:
        summary["not_implemented"] = task.unimplemented
    timeouts = sum(r.get("regex_timeout", False) for r in records)
    if timeouts:
        summary["regex_timeouts"] = timeouts
    return {**summary, "records": records}


def _mean(values: Sequence[float]) -> float:
    """The mean, finite for any finite values: where sum(x) overflows (target_scores of
    1e308), sum(x / n) does not."""
    total = sum(values)
    return total / len(values) if math.isfinite(total) else sum(x / len(values) for x in values)


def _check_fits(model, records, i: int, answer: str, ids: list[int]) -> None:
    if len(ids) > model.cfg.block_size:
        raise ValueError(
            f"example {records[i]['index']}: the answer {answer[:30]!r}... is {len(ids)} "
            f"tokens, more than the model's block_size {model.cfg.block_size} can score"
        )


def _score_choices(model, tokenizer, examples, prompts, batch_size, records) -> dict:
    pairs, owner = [], []
    for i, (ex, prompt) in enumerate(zip(examples, prompts, strict=True)):
        for choice in ex.choices:
            pairs.append(encode_pair(tokenizer, prompt, choice))
            _check_fits(model, records, i, choice, pairs[-1][1])
            owner.append(i)
    logprobs = continuation_logprobs(model, pairs, batch_size, vocab_size=tokenizer.n_vocab)
    per_example: list[list[float]] = [[] for _ in examples]
    for lp, i in zip(logprobs, owner, strict=True):
        per_example[i].append(lp)
    grades, grades_norm = [], []
    for record, ex, lp in zip(records, examples, per_example, strict=True):
        per_byte = [x / max(1, len(c.encode("utf-8"))) for x, c in zip(lp, ex.choices, strict=True)]
        pred = max(range(len(lp)), key=lp.__getitem__)  # ties: the first
        pred_norm = max(range(len(lp)), key=per_byte.__getitem__)
        grades.append(ex.scores[pred])
        grades_norm.append(ex.scores[pred_norm])
        record.update(
            choices=ex.choices,
            scores=ex.scores,
            answers=ex.correct,
            logprobs=lp,
            predicted=pred,
            predicted_norm=pred_norm,
            correct=pred in ex.correct,
            correct_norm=pred_norm in ex.correct,
        )
    return {
        "multiple_choice_grade": _mean(grades),
        "multiple_choice_grade_per_byte": _mean(grades_norm),
    }


def _score_generation(
    model, tokenizer, task, examples, prompts, batch_size, max_new_tokens, stops, progress,
    records,
) -> dict:  # fmt: skip
    block = model.cfg.block_size
    pairs = [
        encode_pair(tokenizer, p, ex.targets[0]) for ex, p in zip(examples, prompts, strict=True)
    ]
    for i, (ex, (_, ids)) in enumerate(zip(examples, pairs, strict=True)):
        _check_fits(model, records, i, ex.targets[0], ids)
    logprobs = continuation_logprobs(model, pairs, batch_size, vocab_size=tokenizer.n_vocab)
    if stops is None:
        stops = ("\n",) if task.strip else tuple(s for s in [task.stop_string] if s)
    names = [m for m in task.metrics if m != "multiple_choice_grade"]
    hits = dict.fromkeys(names, 0)
    bar = tqdm(examples, desc="generating", unit="example", disable=not progress, leave=False)
    for record, ex, prompt, lp in zip(records, bar, prompts, logprobs, strict=True):
        new = max_new_tokens
        if new is None:  # room for the longest target, and a little more
            new = max(len(tokenizer.encode(t)) for t in ex.targets) + 4
        stripped = prompt.rstrip(" ")  # its trailing spaces are the output's to write
        moved = prompt[len(stripped) :]
        ids = (tokenizer.encode(stripped) or [tokenizer.eot])[-(block - 1) :]
        raw = sample_texts(model, tokenizer, ids, 1, new, temperature=0.0, stops=stops)[0]
        raw = raw[len(moved) :] if raw.startswith(moved) else raw
        try:
            output = raw.strip() if task.strip else normalise_output(task, raw)
        except bounded_regex.RegexTimeout:
            output = None  # a miss, whatever the targets
            record["regex_timeout"] = True
            if sum(r.get("regex_timeout", False) for r in records) == 1:
                print(
                    f"warning: task {task.name}: output_regex {task.output_regex!r} ran past "
                    f"{bounded_regex.REGEX_TIMEOUT_S:g} s on example {record['index']} "
                    f"({len(raw)} characters of output); it scores as a miss (the results "
                    "count every such example under regex_timeouts)",
                    file=sys.stderr,
                )
        record.update(targets=ex.targets, raw_output=raw, output=output, target_logprob=lp)
        for name in names:
            hit = output is not None and _string_match(task, name, output, ex.targets)
            hits[name] += hit
            record[name] = hit
        record["correct"] = record[names[0]]
    return {name: count / len(examples) for name, count in hits.items()}


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if math.isfinite(100 * value):
        return f"{100 * value:.1f}%"
    mantissa, exponent = f"{value:.2e}".split("e")  # x 100 would overflow: shift the exponent
    return f"{mantissa}e{int(exponent) + 2:+d}%"


def format_table(rows: list[dict]) -> str:
    """A text table, one line per (task, shots, metric) of evaluated results (``evaluate_task``
    dicts): task, kind, shots, examples, metric, value, chance."""
    head = ("task", "kind", "shots", "examples", "metric", "value", "chance")
    lines = [head]
    for r in rows:
        for metric, value in r["metrics"].items():
            kind = "multiple_choice" if metric == "multiple_choice_grade" else "generative"
            chance = r.get("chance") if kind == "multiple_choice" else None
            cells = (r["task"], kind, str(r["shots"]), str(r["examples"]), metric, _pct(value))
            lines.append((*cells, _pct(chance)))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    text = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def format_summary(results: dict) -> str:
    """The table of one ``evaluate_task`` result."""
    return format_table([results])
