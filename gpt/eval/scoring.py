"""In-context evaluation: score a task's examples with a few-shot prompt.

Multiple choice is scored as in GPT-3 (Brown et al. 2020) and lm-evaluation-harness: each
choice's log-likelihood given the prompt, log p(choice | prompt) = sum over the choice's
tokens of log p(token | everything before it); the prediction is the most likely choice
(``accuracy``) or the most likely per UTF-8 byte of the choice (``accuracy_norm``, which
removes the bias towards short choices). The prompt and the choice are tokenized separately,
with the prompt's trailing spaces moved to the start of the choice, so that " Paris" is one
GPT-2 token as in running text. Generative examples are decoded greedily up to a stop string
and scored by exact match after stripping whitespace; the targets' log-likelihoods are
recorded too. All (prompt, continuation) pairs are scored in padded batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from gpt.eval.tasks import Task, build_prompt, select_shots
from gpt.generate import sample_texts
from gpt.model import GPT


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


@torch.no_grad()
def continuation_logprobs(
    model: GPT,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """log p(continuation | context) in nats for each (context ids, continuation ids) pair.
    A context that does not fit is cut from the left to the last block_size + 1 tokens."""
    block = model.cfg.block_size
    rows = []
    for ctx, cont in pairs:
        if not ctx or not cont or len(cont) > block:
            raise ValueError(
                f"need a non-empty context and 1..{block} continuation tokens "
                f"(block_size), got {len(ctx)} and {len(cont)}"
            )
        rows.append(((ctx + cont)[-(block + 1) :], len(cont)))
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    out = [0.0] * len(rows)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(seq) for seq, _ in batch) - 1
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (seq, _) in enumerate(batch):  # right padding: causal attention never sees it
            idx[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            targets[b, : len(seq) - 1] = torch.tensor(seq[1:])
        logp = torch.log_softmax(model(idx.to(device)).float(), dim=-1)  # (B, T, V)
        picked = logp.gather(-1, targets.to(device)[..., None])[..., 0].cpu()  # (B, T)
        for b, (seq, n_cont) in enumerate(batch):
            end = len(seq) - 1  # the continuation's tokens are the last n_cont targets
            out[order[start + b]] = picked[b, end - n_cont : end].double().sum().item()
    return out


def evaluate_task(
    model: GPT,
    tokenizer,
    task: Task,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    stops: Sequence[str] = ("\n",),
    progress: bool = True,
) -> dict:
    """Score the first ``limit`` examples of ``task`` with ``shots`` demonstrations each; a
    JSON-serialisable dict with the summary figures and one record per example."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        examples = task.examples[:limit]
        prompts = [
            build_prompt(task, ex, select_shots(task, shots, seed, i))
            for i, ex in enumerate(examples)
        ]
        if task.multiple_choice:
            records = _score_choices(model, tokenizer, examples, prompts, batch_size, progress)
        else:
            records = _score_generation(
                model, tokenizer, examples, prompts, batch_size, max_new_tokens, stops, progress
            )
    finally:
        model.train(was_training)
    n = len(records)
    summary = {
        "task": task.name,
        "path": str(task.path),
        "kind": "multiple_choice" if task.multiple_choice else "generative",
        "shots": shots,
        "seed": seed,
        "examples": n,
        "accuracy": sum(r["correct"] for r in records) / n,
    }
    if task.multiple_choice:
        summary["accuracy_norm"] = sum(r["correct_norm"] for r in records) / n
        summary["chance"] = sum(len(e.correct) / len(e.choices) for e in examples) / n
    return {**summary, "records": records}


def _score_choices(model, tokenizer, examples, prompts, batch_size, progress) -> list[dict]:
    pairs, owner = [], []
    for i, (ex, prompt) in enumerate(zip(examples, prompts, strict=True)):
        for choice in ex.choices:
            pairs.append(encode_pair(tokenizer, prompt, choice))
            owner.append(i)
    logprobs = continuation_logprobs(model, pairs, batch_size, progress)
    records = []
    for i, ex in enumerate(examples):
        lp = [x for x, o in zip(logprobs, owner, strict=True) if o == i]
        per_byte = [x / max(1, len(c.encode("utf-8"))) for x, c in zip(lp, ex.choices, strict=True)]
        pred = max(range(len(lp)), key=lp.__getitem__)
        pred_norm = max(range(len(lp)), key=per_byte.__getitem__)
        records.append(
            {
                "index": i,
                "choices": ex.choices,
                "answers": ex.correct,
                "logprobs": lp,
                "predicted": pred,
                "predicted_norm": pred_norm,
                "correct": pred in ex.correct,
                "correct_norm": pred_norm in ex.correct,
            }
        )
    return records


def _score_generation(
    model, tokenizer, examples, prompts, batch_size, max_new_tokens, stops, progress
) -> list[dict]:
    block = model.cfg.block_size
    pairs = [
        encode_pair(tokenizer, p, ex.targets[0]) for ex, p in zip(examples, prompts, strict=True)
    ]
    logprobs = continuation_logprobs(model, pairs, batch_size, progress)
    records = []
    bar = tqdm(examples, desc="generating", unit="example", disable=not progress, leave=False)
    for i, (ex, prompt) in enumerate(zip(bar, prompts, strict=True)):
        new = max_new_tokens
        if new is None:  # room for the longest target, and a little more
            new = max(len(tokenizer.encode(t)) for t in ex.targets) + 4
        ids = (tokenizer.encode(prompt) or [tokenizer.eot])[-(block - 1) :]
        output = sample_texts(model, tokenizer, ids, 1, new, temperature=0.0, stops=stops)[0]
        records.append(
            {
                "index": i,
                "targets": ex.targets,
                "output": output,
                "target_logprob": logprobs[i],
                "correct": output.strip() in {t.strip() for t in ex.targets},
            }
        )
    return records


def format_summary(results: dict) -> str:
    """A one-row table: task, kind, shots, examples, accuracy, accuracy_norm, chance."""

    def pct(key: str) -> str:
        value = results.get(key)
        return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"

    head = ("task", "kind", "shots", "examples", "accuracy", "acc_norm", "chance")
    row = (
        results["task"],
        results["kind"],
        str(results["shots"]),
        str(results["examples"]),
        pct("accuracy"),
        pct("accuracy_norm"),
        pct("chance"),
    )
    widths = [max(len(a), len(b)) for a, b in zip(head, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in (head, row)
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), lines[1]])
