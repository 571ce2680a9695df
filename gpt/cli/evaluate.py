"""Evaluate a GPT in context: task files at several shot counts, a table, JSON and a plot.

    python -m gpt.eval --ckpt PATH --tasks TASKS [TASKS ...] [--shots K [K ...]] [--limit N]
        [--kind multiple_choice|generative] [--out results.json] [--plot shots.png]

TASKS are task files, directories (every task.json and .jsonl below) or glob patterns: a
whole BIG-bench checkout in one go, each task at each --shots count (docs/evaluation.md).
``sample.py --eval TASKS ...``, the older spelling, forwards here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gpt.cli.model_flags import (
    HelpWithDefaults,
    add_model_flags,
    check_model_flags,
    load_model,
    show_prompt,
    unescape_text_flags,
)
from gpt.eval.scoring import format_table
from gpt.eval.suite import (
    format_skipped,
    plan_suite,
    plot_shot_curves,
    replace_non_finite,
    run_suite,
)
from gpt.fileio import plot_beside, write_output

PROG = "python -m gpt.eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        allow_abbrev=False,  # --task (sample.py's) must not pass for --tasks
        epilog="In --template, --separator and --stop, \\n and \\t are read as escapes.",
        formatter_class=HelpWithDefaults,
    )
    add_model_flags(p)
    p.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        metavar="TASKS",
        help="task files, directories (every task.json and .jsonl below) or glob patterns",
    )
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=[0],
        metavar="K",
        help="demonstrations per query, one or several counts, e.g. 0 1 2 4 8",
    )
    p.add_argument("--limit", type=int, help="score N examples per task, drawn with --seed")
    p.add_argument("--seed", type=int, default=1337, help="the --limit queries and the shots")
    p.add_argument(
        "--kind",
        choices=["multiple_choice", "generative"],
        help="only the metrics of this kind (tasks without one are skipped)",
    )
    p.add_argument("--template", help="example template with {input} and {choices}")
    p.add_argument("--separator", help="between demonstrations")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generative tasks: tokens per answer [default: the longest target + 4]",
    )
    p.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        metavar="STR",
        help="generative tasks: end an answer before any of these strings "
        "[default: the task's stop string; a newline for JSONL]",
    )
    p.add_argument("--batch-size", type=int, default=16, help="continuations per batch")
    p.add_argument("--show-prompt", action="store_true", help="print every prompt")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="plot metric against shots per task [default with several --shots and --out: "
        "beside --out]",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if any(k < 0 for k in args.shots):
            raise ValueError(f"--shots must be >= 0, got {' '.join(map(str, args.shots))}")
        if len(args.shots) != len(set(args.shots)):
            raise ValueError(f"--shots lists a count twice: {' '.join(map(str, args.shots))}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_new_tokens is not None and args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        check_model_flags(args)
        if args.plot is None and len(args.shots) > 1:
            args.plot = plot_beside(args.out)
        for flag in ("out", "plot"):  # found now, not after a whole evaluation
            if getattr(args, flag):
                check_output(f"--{flag}", getattr(args, flag))
    except ValueError as err:
        p.error(str(err))
    return unescape_text_flags(args)


def check_output(flag: str, value: str) -> None:
    """ValueError naming ``flag`` if ``value`` cannot be written as a file."""
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name, e.g. {path}/results")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"{flag} {path}: {ancestor} is not writable")


def write_report(args: argparse.Namespace, results: list[dict], skipped: list[dict]) -> None:
    keys = ("ckpt", "tasks", "shots", "seed", "limit", "kind", "template", "separator",
            "batch_size")  # fmt: skip
    config = {k: getattr(args, k) for k in keys}
    config["eval"] = args.tasks  # its name before this command existed (sample.py --eval)
    report = {"config": config, "results": results, "skipped": skipped}
    report, notes = replace_non_finite(report)  # standard JSON has no NaN or Infinity
    report["notes"] = notes
    write_output(args.out, json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"results written to {args.out}")
    if notes:
        print(
            f"{PROG}: warning: {args.out}: non-finite numbers (NaN, infinity) written as null; "
            f'its "notes" say where, the first: {notes[0]}',
            file=sys.stderr,
        )


def evaluate(args: argparse.Namespace, model, tokenizer) -> None:
    start = time.perf_counter()
    planned, skipped = plan_suite(
        args.tasks, args.shots, args.seed, args.limit, args.template, args.separator,
        kind=args.kind,
    )  # fmt: skip
    if not planned:
        raise ValueError(f"--tasks {' '.join(args.tasks)}: no task can be evaluated\n"
                         + format_skipped(skipped))  # fmt: skip
    if args.show_prompt:
        for plan in planned:
            for k in args.shots:
                for (i, _), prompt in zip(plan.queries, plan.prompts[k], strict=True):
                    show_prompt(prompt, f"{plan.task.name}, example {i}, {k}-shot prompt")
    alone = len(args.tasks) == 1 and Path(args.tasks[0]).is_file()  # its problem is an error
    results = run_suite(
        model, tokenizer, planned, args.shots, args.seed, args.batch_size, args.max_new_tokens,
        args.stop, skipped=None if alone else skipped,
    )  # fmt: skip
    skipped.sort(key=lambda s: s["path"])
    print(format_table(results))
    if skipped:
        print(format_skipped(skipped))
    n = sum(r["examples"] for r in results)
    tasks = len({r["path"] for r in results})
    print(f"{tasks} tasks x {len(args.shots)} shot counts ({n} queries) evaluated, "
          f"{len(skipped)} skipped, in {time.perf_counter() - start:.1f} s")  # fmt: skip
    if args.out:
        write_report(args, results, skipped)
    if args.plot:
        path = plot_shot_curves(results, args.plot, title=str(args.ckpt))
        print(f"shot curves written to {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args, PROG)
        evaluate(args, model, tokenizer)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
