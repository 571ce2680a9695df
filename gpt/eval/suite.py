"""Many tasks at several shot counts in one run: a task suite (e.g. every BIG-bench JSON task)
evaluated at 0 and k shots, one JSON of results, a table and a shot-curve plot.

Every task is planned before any model work: loaded, its queries drawn and every prompt for
every shot count built, so that a task that cannot run (a metric we do not implement, too few
examples for k shots, a malformed file, a container whose subtasks are run instead) is
skipped with a one-line reason up front rather than failing halfway. A single task file named
on its own is not skipped: its problem is an error.

The results are written as standard JSON (RFC 8259 has no NaN or Infinity): a task file's
non-finite scores are refused when it loads, and any non-finite number computed later (a
broken model's NaN log-likelihoods) is written as null, with a note saying where.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpt.eval.scoring import evaluate_prompts, prepare_prompts, query_indices
from gpt.eval.tasks import (
    GENERATIVE_METRICS,
    IMPLEMENTED_METRICS,
    MULTIPLE_CHOICE_METRICS,
    Example,
    Task,
    find_task_files,
    load_task,
    task_name,
)
from gpt.fileio import write_figure

MAX_PANELS = 48  # per-task panels of the shot-curve plot; the rest are in the JSON
MAX_NOTES = 100  # notes of non-finite numbers written as null; the rest are counted


@dataclass
class PlannedTask:
    task: Task  # without its examples (a suite's files hold millions)
    queries: list[tuple[int, Example]]  # (index in the file, example)
    prompts: dict[int, list[str]]  # shots -> the prompt of each query


def plan_suite(
    specs: Sequence[str],
    shots: Sequence[int],
    seed: int = 1234,
    limit: int | None = None,
    template: str | None = None,
    separator: str | None = None,
    progress: bool = True,
    kind: str | None = None,
) -> tuple[list[PlannedTask], list[dict]]:
    """Load every task file named by ``specs`` (files, directories, globs) and build all its
    prompts; returns the planned tasks and the skipped ones ({task, path, reason}). ``kind``
    ("multiple_choice" or "generative") keeps only the metrics of that kind."""
    if kind not in (None, "multiple_choice", "generative"):
        raise ValueError(f"--kind must be multiple_choice or generative, got {kind!r}")
    files = sorted({p for spec in specs for p in find_task_files(spec)})
    alone = len(specs) == 1 and Path(specs[0]).is_file()
    planned, skipped = [], []
    bar = tqdm(files, desc="planning", unit="task", disable=not progress or alone, leave=False)
    for path in bar:
        try:
            task = load_task(path, template, separator)
            if not task.metrics:
                raise ValueError(
                    f"{path}: its metrics ({', '.join(task.unimplemented) or 'none'}) are not "
                    f"implemented; implemented: {', '.join(IMPLEMENTED_METRICS)}"
                )
            if kind is not None:
                wanted = (
                    MULTIPLE_CHOICE_METRICS if kind == "multiple_choice" else GENERATIVE_METRICS
                )
                task.metrics = [m for m in task.metrics if m in wanted]
                task.multiple_choice = kind == "multiple_choice"
                if not task.metrics:
                    raise ValueError(f"{path}: no {kind} metric (--kind {kind})")
            queries = query_indices(task, seed, limit)
            prompts = {k: prepare_prompts(task, k, seed, queries) for k in shots}
        except Exception as err:  # one bad file is reported and skipped, never ends the suite
            if alone:
                raise
            reason = str(err).splitlines()[0].removeprefix(f"{path}: ").removeprefix(f"{path}, ")
            if not isinstance(err, ValueError | OSError):  # not a message of ours: say what
                reason = f"{type(err).__name__} while loading: {reason}"
            skipped.append({"task": task_name(path), "path": str(path), "reason": reason})
            continue
        examples = [(i, task.examples[i]) for i in queries]
        planned.append(PlannedTask(dataclasses.replace(task, examples=[]), examples, prompts))
    return planned, skipped


def run_suite(
    model,
    tokenizer,
    planned: list[PlannedTask],
    shots: Sequence[int],
    seed: int = 1234,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    stops: Sequence[str] | None = None,
    progress: bool = True,
    skipped: list[dict] | None = None,
) -> list[dict]:
    """Evaluate every planned task at every shot count; results in (task, shots) order. A
    task that turns out not to fit the model (an answer longer than its context) raises, or
    with a ``skipped`` list is left out and added there with the reason, the other tasks'
    results kept."""
    results = []
    runs = len(planned) * len(shots)
    bar = tqdm(total=runs, desc="evaluating", unit="run", disable=not progress or runs < 2)
    for plan in planned:
        done = []
        for k in shots:
            bar.set_postfix_str(f"{plan.task.name} {k}-shot", refresh=False)
            try:
                result = evaluate_prompts(
                    model, tokenizer, plan.task, plan.queries, plan.prompts[k], k, seed,
                    batch_size, max_new_tokens, stops, progress=False,
                )  # fmt: skip
            except ValueError as err:
                if skipped is None:
                    raise ValueError(f"{plan.task.path}: {err}") from None
                reason = str(err).splitlines()[0]
                skipped.append({"task": plan.task.name, "path": str(plan.task.path),
                                "reason": reason})  # fmt: skip
                bar.update(len(shots) - shots.index(k))  # this and the later counts
                done = []
                break
            done.append(result)
            bar.update()
        results += done
    bar.close()
    return results


def replace_non_finite(value, where: str = "") -> tuple[object, list[str]]:
    """``value`` (JSON-like: dicts, lists, numbers, strings) with every NaN and infinity
    replaced by None, and a note per replacement naming where it was (the first MAX_NOTES,
    then a count), so that ``json.dumps(..., allow_nan=False)`` succeeds."""
    notes: list[str] = []
    found = 0

    def walk(v, at: str):
        nonlocal found
        if isinstance(v, float) and not math.isfinite(v):
            found += 1
            if len(notes) < MAX_NOTES:
                notes.append(f"{at or 'the value'}: {v} written as null")
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, f"{at}[{i}]") for i, x in enumerate(v)]
        return v

    out = walk(value, where)
    if found > len(notes):
        notes.append(f"... and {found - len(notes)} more non-finite numbers written as null")
    return out, notes


def format_skipped(skipped: list[dict]) -> str:
    return "\n".join(f"skipped {s['task']}: {s['reason']}" for s in skipped)


def plot_shot_curves(results: list[dict], path: str | Path, title: str = "") -> Path:
    """Metric value against the number of shots, one panel per task (the first MAX_PANELS -
    1), after a first panel with the mean over all tasks; chance level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str], dict[int, float]] = {}
    chance: dict[str, float] = {}
    for r in results:
        for metric, value in r["metrics"].items():
            curves.setdefault((r["task"], metric), {})[r["shots"]] = value
        if "chance" in r:
            chance[r["task"]] = r["chance"]
    by_metric: dict[str, dict[int, list[float]]] = {}
    for (_, metric), points in curves.items():
        for k, v in points.items():
            by_metric.setdefault(metric, {}).setdefault(k, []).append(v)
    panels: list[tuple[str, str | None, dict]] = [("mean over tasks", None, by_metric)]
    for (task, metric), points in list(curves.items())[: MAX_PANELS - 1]:
        panels.append((task, metric, {metric: {k: [v] for k, v in points.items()}}))
    colors = {m: f"C{i}" for i, m in enumerate(sorted(by_metric))}
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, metric, series) in zip(axes.flat, panels, strict=False):
        for m, points in series.items():
            ks = sorted(points)
            mean = [sum(points[k]) / len(points[k]) for k in ks]
            ax.plot(ks, mean, "o-", label=m, color=colors[m])
        if metric == "multiple_choice_grade" and name in chance:  # chance of this metric only
            ax.axhline(chance[name], color="grey", linestyle="--", linewidth=1)
        ax.set_title(name if metric is None else f"{name}\n{metric}", fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6)
    more = len(curves) - (MAX_PANELS - 1)
    suptitle = title + (f" ({more} more curves in the JSON)" if more > 0 else "")
    fig.supxlabel("shots (demonstrations in the prompt)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return write_figure(fig, path, dpi=80)
