"""Sample from a GPT, build few-shot prompts, evaluate in context, draw attention maps.

    python sample.py --ckpt PATH [--prompt TEXT | --prompt-file F | stdin] [--num-samples N]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
    python sample.py --ckpt PATH --task TASK_FILE [--example I | --prompt TEXT] --shots K
    python sample.py --ckpt PATH --eval TASKS [TASKS ...] [--shots K [K ...]] [--limit N]
        [--out results.json] [--plot shots.png]
    python sample.py --ckpt PATH --prompt TEXT --attention-map OUT.png

PATH is a training run directory (its latest complete checkpoint), one checkpoint, an exported
model/ directory or a Hugging Face GPT-2 directory. TASKS are task files, directories (every
task.json and .jsonl below) or glob patterns: a whole BIG-bench checkout in one go, each task at
each --shots count (docs/evaluation.md). Decoding uses a KV cache (gpt/generate.py); several
samples decode as one batch and the first streams to the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from gpt import store
from gpt.attention import get_attention
from gpt.data.tokenizer import get_tokenizer
from gpt.eval.attention_map import attention_weights, plot_attention_map, token_labels
from gpt.eval.scoring import format_table
from gpt.eval.suite import (
    format_skipped,
    plan_suite,
    plot_shot_curves,
    replace_non_finite,
    run_suite,
)
from gpt.eval.tasks import Example, build_prompt, decode_utf8, load_task, read_utf8, select_shots
from gpt.fileio import write_output
from gpt.generate import check_sampling, encode_prompt, sample_texts
from gpt.memory import available_memory, check_decode_memory


class HelpWithDefaults(argparse.HelpFormatter):
    """Show "(default: X)" only for flags whose default is a value (not None / off)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description=__doc__.splitlines()[0],
        epilog="In --template, --separator and --stop, \\n and \\t are read as escapes.",
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint, model/ or HF GPT-2 dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: stdin when piped, else empty)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="samples, decoded as one batch")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens per sample [default: 200; eval: longest target + 4]",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, help="keep the K most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus: smallest set with this much mass")
    p.add_argument("--seed", type=int, default=1337, help="sampling and shot selection")
    p.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        metavar="STR",
        help="end a sample before any of these strings [eval default: a newline]",
    )
    p.add_argument("--attention", help="attention backend [default: the model's, else sdpa]")
    p.add_argument("--tokenizer", help="encoding [default: recorded in the export, else gpt2]")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs: cpu, cuda, cuda:N [default: cuda when available, else cpu]",
    )
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the context each step")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the one-token decoding step (costs seconds once; for long outputs)",
    )
    p.add_argument(
        "--window-keep",
        type=int,
        help="past block_size, rebuild the KV cache from "
        "this many last tokens [default: block_size, exact and slow]",
    )
    p.add_argument("--task", help="build the prompt from this task file (.jsonl / BIG-bench)")
    p.add_argument("--example", type=int, help="with --task: the example to query [default: 0]")
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=[0],
        metavar="K",
        help="demonstrations; 0 is zero-shot; with --eval several counts, e.g. 0 1 2 4 8",
    )
    p.add_argument(
        "--template",
        help="example template with {input} and {choices}",
    )
    p.add_argument("--separator", help="between demonstrations")
    p.add_argument("--show-prompt", action="store_true", help="print the exact prompt(s)")
    p.add_argument(
        "--eval",
        nargs="+",
        metavar="TASKS",
        help="evaluate in context on these task files, directories or glob patterns",
    )
    p.add_argument(
        "--limit", type=int, help="with --eval: score N examples per task, drawn with --seed"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="with --eval: continuations per batch"
    )
    p.add_argument(
        "--kind",
        choices=["multiple_choice", "generative"],
        help="with --eval: only the metrics of this kind (tasks without one are skipped)",
    )
    p.add_argument("--out", help="with --eval: write the results as JSON here")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="with --eval: plot metric against shots per task [default with several --shots "
        "and --out: beside --out]",
    )
    p.add_argument("--attention-map", metavar="OUT.png", help="draw the prompt's attention")
    args = p.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.max_new_tokens is not None and args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if any(k < 0 for k in args.shots):
            raise ValueError(f"--shots must be >= 0, got {' '.join(map(str, args.shots))}")
        if len(args.shots) != len(set(args.shots)):
            raise ValueError(f"--shots lists a count twice: {' '.join(map(str, args.shots))}")
        if len(args.shots) > 1 and not args.eval:
            raise ValueError("several --shots counts need --eval (a prompt has one count)")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.eval and (args.task or args.attention_map):
            raise ValueError("--eval cannot be combined with --task or --attention-map")
        if args.example is not None and (not args.task or args.prompt or args.prompt_file):
            raise ValueError("--example needs --task (and no --prompt: that is the query)")
        if (args.out or args.plot) and not args.eval:
            raise ValueError("--out and --plot go with --eval")
        if args.attention is not None:
            get_attention(args.attention)  # unknown or unusable: the error lists the valid names
        check_device(args.device)
        # beside a regular (or new) file only: never /dev/null.png
        regular = bool(args.out) and (Path(args.out).is_file() or not Path(args.out).exists())
        if args.eval and args.plot is None and regular and len(args.shots) > 1:
            args.plot = str(Path(args.out).with_suffix(".png"))
        for flag in ("out", "plot"):  # found now, not after a whole evaluation
            if getattr(args, flag):
                check_output(f"--{flag}", getattr(args, flag))
    except ValueError as err:
        p.error(str(err))
    for key in ("template", "separator", "stop"):  # \n and \t typed on a command line
        value = getattr(args, key)
        if isinstance(value, str):
            setattr(args, key, unescape(value))
        elif value is not None:
            setattr(args, key, [unescape(v) for v in value])
    return args


def check_device(name: str) -> None:
    """ValueError naming --device if it is not a device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"--device {name!r} is not a device ({err}); valid: cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; valid: cpu, cuda, cuda:N, mps")


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


def load_model(args: argparse.Namespace):
    # "naive" always builds; a LoRA run's adapters are merged into its base
    model = store.load_model(args.ckpt, attention="naive")
    model_dir = store.model_dir_of(args.ckpt)
    recorded = json.loads((model_dir / "config.json").read_text()).get("gpt_config", {})
    try:
        model.set_attention(args.attention or recorded.get("attention", "sdpa"))
    except ValueError as err:  # e.g. trained with "triton", sampled without a GPU
        print(f"sample.py: warning: {err}; using sdpa", file=sys.stderr)
        model.set_attention("sdpa")
    model.to(args.device).eval()
    name = args.tokenizer or store.tokenizer_of(args.ckpt) or "gpt2"
    tokenizer = get_tokenizer(name)
    if tokenizer.n_vocab > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {name!r} has {tokenizer.n_vocab} tokens but the model in {model_dir} "
            f"has a vocabulary of {model.cfg.vocab_size}; pass --tokenizer"
        )
    return model, tokenizer


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path}: no such file")
        try:
            return read_utf8(path, "prompt files")
        except ValueError as err:  # not UTF-8: the message names the file, line and byte
            raise ValueError(f"--prompt-file {err}") from None
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    if not hasattr(sys.stdin, "buffer"):  # already text (a test's StringIO)
        return sys.stdin.read()
    return decode_utf8(sys.stdin.buffer.read(), "stdin", "a piped prompt")


def show_prompt(prompt: str, header: str) -> None:
    print(f"===== {header} =====\n{prompt}\n===== end of prompt =====", flush=True)


def run_eval(args, model, tokenizer) -> None:
    start = time.perf_counter()
    planned, skipped = plan_suite(
        args.eval, args.shots, args.seed, args.limit, args.template, args.separator,
        kind=args.kind,
    )  # fmt: skip
    if not planned:
        raise ValueError(f"--eval {' '.join(args.eval)}: no task can be evaluated\n"
                         + format_skipped(skipped))  # fmt: skip
    if args.show_prompt:
        for plan in planned:
            for k in args.shots:
                for (i, _), prompt in zip(plan.queries, plan.prompts[k], strict=True):
                    show_prompt(prompt, f"{plan.task.name}, example {i}, {k}-shot prompt")
    alone = len(args.eval) == 1 and Path(args.eval[0]).is_file()  # its problem is an error
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
        keys = ("ckpt", "eval", "shots", "seed", "limit", "kind", "template", "separator",
                "batch_size")  # fmt: skip
        config = {k: getattr(args, k) for k in keys}
        report = {"config": config, "results": results, "skipped": skipped}
        report, notes = replace_non_finite(report)  # standard JSON has no NaN or Infinity
        report["notes"] = notes
        write_output(args.out, json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"results written to {args.out}")
        if notes:
            print(
                f"sample.py: warning: {args.out}: non-finite numbers (NaN, infinity) written "
                f'as null; its "notes" say where, the first: {notes[0]}',
                file=sys.stderr,
            )
    if args.plot:
        path = plot_shot_curves(results, args.plot, title=str(args.ckpt))
        print(f"shot curves written to {path}")


def task_prompt(args, prompt: str | None) -> str:
    """A few-shot prompt whose query is --prompt / --prompt-file, else example --example."""
    task = load_task(args.task, args.template, args.separator)
    if prompt is None:
        index = args.example or 0
        if not 0 <= index < len(task.examples):
            raise ValueError(
                f"--example {index} is out of range: {task.path} has {len(task.examples)} examples"
            )
        return build_prompt(
            task, task.examples[index], select_shots(task, args.shots[0], args.seed, index)
        )
    query = Example(prompt)
    return build_prompt(task, query, select_shots(task, args.shots[0], args.seed, query))


def draw_attention_map(args, model, tokenizer, ids: list[int]) -> None:
    weights = attention_weights(model, torch.tensor([ids], device=args.device))
    title = f"{args.ckpt}: {len(ids)} tokens"
    path = plot_attention_map(weights, token_labels(tokenizer, ids), args.attention_map, title)
    print(f"attention map ({len(weights)} layers x {weights[0].shape[0]} heads) written to {path}")


def print_samples(args, model, tokenizer, ids: list[int]) -> None:
    prompt = tokenizer.decode(ids)

    def stream(i: int, piece: str) -> None:  # the first sample streams as it is generated
        if i == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()

    sys.stdout.write(prompt)
    max_new = 200 if args.max_new_tokens is None else args.max_new_tokens
    texts = sample_texts(
        model, tokenizer, ids, args.num_samples, max_new, args.temperature, args.top_k,
        args.top_p, args.seed, args.stop or (), not args.no_kv_cache, stream, args.window_keep,
        compile=args.compile,
    )  # fmt: skip
    for text in texts[1:]:  # decoded in the same batch; printed once all are done
        print(f"\n{'-' * 40}\n{prompt}{text}", end="")
    print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args)
        if args.eval:
            return run_eval(args, model, tokenizer)
        if args.task:  # the query: --prompt / --prompt-file, else example --example
            given = args.prompt is not None or args.prompt_file is not None
            prompt = task_prompt(args, read_prompt(args) if given else None)
        else:
            prompt = read_prompt(args)
        if args.show_prompt:
            show_prompt(prompt, "prompt")
        ids, warning = encode_prompt(tokenizer, prompt, model.cfg.block_size)
        if warning:
            print(f"sample.py: warning: {warning}", file=sys.stderr)
        if args.attention_map:
            return draw_attention_map(args, model, tokenizer, ids)
        # the whole batch is allocated at once: refuse what cannot fit, saying what would
        max_new = 200 if args.max_new_tokens is None else args.max_new_tokens
        weight_bytes = next(model.parameters()).element_size()
        check_decode_memory(
            model.cfg, args.num_samples, len(ids), max_new, weight_bytes,
            available_memory(args.device),
        )  # fmt: skip
        print_samples(args, model, tokenizer, ids)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        sys.exit(2)
