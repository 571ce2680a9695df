"""Sample from a GPT (a prompt, or a task file's few-shot prompt); draw a prompt's attention.

    python sample.py --ckpt PATH [--prompt TEXT | --prompt-file F | stdin] [--num-samples N]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR ...]
    python sample.py --ckpt PATH --task TASK_FILE [--example I | --prompt TEXT] [--shots K]
    python sample.py --ckpt PATH --prompt TEXT --attention-map OUT.png

PATH: see --help (the four kinds of directory, gpt/cli/model_flags.py). Decoding uses a KV
cache (gpt/generate.py); several samples decode as one batch and the first streams to the
terminal. Evaluation on task files is its own command, ``python -m gpt.eval``
(gpt/cli/evaluate.py); ``sample.py --eval ...``, its older spelling, forwards there with a
note on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from gpt.cli.model_flags import (
    HelpWithDefaults,
    add_model_flags,
    check_model_flags,
    load_model,
    show_prompt,
    unescape_text_flags,
)
from gpt.eval.attention_map import attention_weights, plot_attention_map, token_labels
from gpt.eval.tasks import Example, build_prompt, decode_utf8, load_task, read_utf8, select_shots
from gpt.generate import check_sampling, encode_prompt, sample_texts
from gpt.memory import available_memory, check_decode_memory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description=__doc__.splitlines()[0],
        epilog="In --template, --separator and --stop, \\n and \\t are read as escapes. "
        "Evaluation on task files: python -m gpt.eval (sample.py --eval forwards there).",
        formatter_class=HelpWithDefaults,
    )
    add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: stdin when piped, else empty)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="samples, decoded as one batch")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, help="keep the K most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus: smallest set with this much mass")
    p.add_argument("--seed", type=int, default=1337, help="sampling and shot selection")
    p.add_argument(
        "--stop",
        nargs="+",
        action="extend",
        metavar="STR",
        help="end a sample before any of these strings",
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
        help="past the context (block_size, or model.rope_scaling's longer one), rebuild the "
        "KV cache from this many last tokens [default: the whole context, exact and slow]",
    )
    few = p.add_argument_group("a few-shot prompt from a task file (docs/evaluation.md)")
    few.add_argument("--task", help="build the prompt from this task file (.jsonl / BIG-bench)")
    few.add_argument(
        "--example", type=int, help="the example to query, unless --prompt is [default: 0]"
    )
    few.add_argument(
        "--shots", type=int, default=0, metavar="K", help="demonstrations [default: 0]"
    )
    few.add_argument("--template", help="example template with {input} and {choices}")
    few.add_argument("--separator", help="between demonstrations")
    p.add_argument("--show-prompt", action="store_true", help="print the exact prompt")
    p.add_argument("--attention-map", metavar="OUT.png", help="draw the prompt's attention")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if args.shots < 0:
            raise ValueError(f"--shots must be >= 0, got {args.shots}")
        if args.example is not None and (not args.task or args.prompt or args.prompt_file):
            raise ValueError("--example needs --task (and no --prompt: that is the query)")
        check_model_flags(args)
    except ValueError as err:
        p.error(str(err))
    return unescape_text_flags(args)


EVAL_FLAG = ("--ev", "--eva", "--eval")  # what argparse took for --eval before it moved


def is_eval_flag(arg: str) -> bool:
    return arg.split("=", 1)[0] in EVAL_FLAG


def forward_to_eval(argv: list[str]) -> None:
    """``sample.py --eval TASKS ...`` (evaluation's old home) as ``python -m gpt.eval``, with
    the flags the old combined parser took by a unique prefix (``--batch``) spelt out."""
    from gpt.cli import evaluate  # here: sampling never loads the suite's modules

    eval_flags = {o for a in evaluate.build_parser()._actions for o in a.option_strings}
    old_flags = eval_flags | {o for a in build_parser()._actions for o in a.option_strings}

    def spelt_out(arg: str) -> str:
        if is_eval_flag(arg):
            return "--tasks" + arg[arg.index("=") :] if "=" in arg else "--tasks"
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name in old_flags:
            return arg
        matches = [f for f in old_flags | {"--eval"} if f.startswith(name)]
        if len(matches) == 1 and matches[0] in eval_flags:
            return matches[0] + eq + value
        return arg

    new = [spelt_out(a) for a in argv]
    print(
        f"sample.py: note: evaluation moved to its own command; running: "
        f"{evaluate.PROG} {shlex.join(new)}",
        file=sys.stderr,
    )
    evaluate.main(new)


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
            task, task.examples[index], select_shots(task, args.shots, args.seed, index)
        )
    query = Example(prompt)
    return build_prompt(task, query, select_shots(task, args.shots, args.seed, query))


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
    texts = sample_texts(
        model, tokenizer, ids, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
        args.top_p, args.seed, args.stop or (), not args.no_kv_cache, stream, args.window_keep,
        compile=args.compile,
    )  # fmt: skip
    for text in texts[1:]:  # decoded in the same batch; printed once all are done
        print(f"\n{'-' * 40}\n{prompt}{text}", end="")
    print()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(map(is_eval_flag, argv)):
        return forward_to_eval(argv)
    args = parse_args(argv)
    try:
        model, tokenizer = load_model(args, "sample.py")
        if args.task:  # the query: --prompt / --prompt-file, else example --example
            given = args.prompt is not None or args.prompt_file is not None
            prompt = task_prompt(args, read_prompt(args) if given else None)
        else:
            prompt = read_prompt(args)
        if args.show_prompt:
            show_prompt(prompt, "prompt")
        ids, warning = encode_prompt(tokenizer, prompt, model.cfg.max_positions)
        if warning:
            print(f"sample.py: warning: {warning}", file=sys.stderr)
        if args.attention_map:
            return draw_attention_map(args, model, tokenizer, ids)
        # the whole batch is allocated at once: refuse what cannot fit, saying what would
        weight_bytes = next(model.parameters()).element_size()
        check_decode_memory(
            model.cfg, args.num_samples, len(ids), args.max_new_tokens, weight_bytes,
            available_memory(args.device),
        )  # fmt: skip
        print_samples(args, model, tokenizer, ids)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        sys.exit(2)
