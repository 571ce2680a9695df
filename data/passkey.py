"""Synthetic passkey retrieval text (Mohtashami & Jaggi 2023, "Landmark Attention"): a
five-digit key hidden at a chosen depth in repeated neutral filler, then the question.

    The grass is green. The sky is blue. ... The pass key is 48213. Remember it. 48213 is
    the pass key. ...
    Here we go. There and back again. What is the pass key? The pass key is

The same prompts serve twice: ``python -m gpt.eval.passkey`` scores a model on them
(gpt/eval/passkey.py), and ``python -m gpt.data.passkey --out DIR`` writes them, answered,
as documents that ``python -m gpt.data.prepare`` mixes into a pretraining corpus, so that a
small base model has the skill at its trained context at all (docs/long-context.md says how
many and why).

Lengths are in tokens of a given tokenizer (byte-level or BPE alike): a prompt of length L is
the longest run of whole filler sentences such that the prompt and its answer (" 48213.")
take at most L tokens. The key sentence goes after round(depth x n) of the n filler
sentences, so its first token sits within one sentence of depth x (filler tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpt.data.tokenizer import NAMES, get_tokenizer
from gpt.fileio import write_output

# The filler of the literature (Landmark Attention, and the passkey tests of YaRN and
# LongLoRA): five neutral sentences, repeated; nothing in them looks like a number.
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}."
KEY_DIGITS = 5
PROG = "python -m gpt.data.passkey"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str  # filler with the key sentence inside, then the question
    ids: list[int]  # its tokens
    key: str  # KEY_DIGITS digits, no leading zero
    answer_tokens: int  # tokens of ANSWER: prompt + answer fit the length asked for
    sentences: int  # filler sentences, the key sentence not counted
    key_index: int  # filler sentences before the key sentence
    key_token: int  # index in ids of the token holding the key sentence's first character
    filler_tokens: int  # tokens the filler adds to the prompt


def draw_keys(n: int, seed: str | int) -> list[str]:
    """``n`` distinct keys of KEY_DIGITS digits (no leading zero), the same for the same seed
    (a string seed is hashed by sha512: stable across runs and Python processes)."""
    low = 10 ** (KEY_DIGITS - 1)
    if n > 9 * low:
        raise ValueError(f"at most {9 * low} distinct keys, asked for {n}")
    return [str(k) for k in random.Random(str(seed)).sample(range(low, 10 * low), n)]


def passkey_text(sentences: int, key_index: int, key: str) -> str:
    """The prompt's text: ``sentences`` filler sentences with the key sentence after the
    first ``key_index`` of them, then the question."""
    assert 0 <= key_index <= sentences, f"key_index {key_index} not in [0, {sentences}]"
    parts = [FILLER[i % len(FILLER)] for i in range(sentences)]
    parts.insert(key_index, KEY_SENTENCE.format(key=key))
    return " ".join([*parts, QUESTION])


def shortest_length(tokenizer) -> int:
    """The shortest length that fits a prompt without filler and its answer for every key:
    the text without the key's digits plus one token per digit of each copy of the key (a
    bound for BPE, where a key may take fewer tokens; exact for bytes)."""
    copies = (KEY_SENTENCE + ANSWER).count("{key}")
    text = passkey_text(0, 0, "") + ANSWER.format(key="")
    return len(tokenizer.encode(text)) + copies * KEY_DIGITS


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The longest passkey prompt whose tokens, with those of its answer, fit in ``length``;
    the key sentence at ``depth`` (0: before all the filler, 1: right before the question)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    answer = len(tokenizer.encode(ANSWER.format(key=key)))
    budget = length - answer

    def tokens(n: int) -> list[int]:
        return tokenizer.encode(passkey_text(n, round(depth * n), key))

    if len(ids := tokens(0)) > budget:
        raise ValueError(
            f"length {length} is too short for a passkey prompt: the key sentence, question "
            f"and answer alone take {len(ids) + answer} tokens of {tokenizer.name!r}"
        )
    # guess from the tokens per sentence, then step to the exact count (whole sentences)
    per_sentence = len(tokenizer.encode(" " + " ".join(FILLER))) / len(FILLER)
    n = max(0, int((budget - len(ids)) / per_sentence))
    while n > 0 and len(tokens(n)) > budget:
        n -= 1
    while len(tokens(n + 1)) <= budget:
        n += 1
    k = round(depth * n)
    text = passkey_text(n, k, key)
    ids = tokenizer.encode(text)
    # the token holding the key sentence's first character (the text is ASCII: one
    # character per byte, so token lengths add up to offsets)
    start, end, key_token = text.index(KEY_SENTENCE.format(key=key)), 0, 0
    while end + len(tokenizer.decode(ids[key_token : key_token + 1])) <= start:
        end += len(tokenizer.decode(ids[key_token : key_token + 1]))
        key_token += 1
    filler = len(ids) - len(tokenizer.encode(passkey_text(0, 0, key)))
    return PasskeyPrompt(text, ids, key, answer, n, k, key_token, filler)


def passkey_documents(
    tokenizer, n: int, max_length: int, min_length: int | None = None, seed: int = 0
):
    """``n`` answered passkey prompts for pretraining: lengths uniform in [min_length,
    max_length] tokens (default min: the shortest possible), depths uniform in [0, 1], keys
    drawn with ``seed``; each prompt text followed by its answer."""
    low = shortest_length(tokenizer) if min_length is None else min_length
    if not low <= max_length:
        raise ValueError(f"--min-length {low} must be <= --max-length {max_length}")
    rng = random.Random(f"passkey-documents:{seed}")
    keys = draw_keys(n, f"passkey-documents-keys:{seed}") if n <= 90_000 else None
    for i in range(n):
        key = keys[i] if keys else str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
        prompt = passkey_prompt(tokenizer, rng.randint(low, max_length), rng.random(), key)
        yield prompt.text + ANSWER.format(key=key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for passkey.jsonl")
    p.add_argument("--docs", type=int, default=5000, help="documents to write (default: 5000)")
    p.add_argument(
        "--max-length",
        type=int,
        required=True,
        help="longest document in tokens of --encoding, e.g. the model's block_size",
    )
    p.add_argument("--min-length", type=int, help="shortest (default: the shortest possible)")
    p.add_argument("--encoding", default="gpt2", help=f"{', '.join(NAMES)} (default: gpt2)")
    p.add_argument("--seed", type=int, default=0, help="keys, lengths and depths (default: 0)")
    args = p.parse_args(argv)
    try:
        if args.encoding not in NAMES:
            raise ValueError(f"--encoding {args.encoding!r} is unknown; valid: {', '.join(NAMES)}")
        if args.docs < 1:
            raise ValueError(f"--docs must be >= 1, got {args.docs}")
        tokenizer = get_tokenizer(args.encoding)
        low = shortest_length(tokenizer)
        for flag, value in (("--max-length", args.max_length), ("--min-length", args.min_length)):
            if value is not None and value < low:
                raise ValueError(
                    f"{flag} {value} is shorter than the shortest passkey document "
                    f"({low} tokens of {args.encoding!r})"
                )
        docs = passkey_documents(tokenizer, args.docs, args.max_length, args.min_length, args.seed)
        lines = [json.dumps({"text": d}) + "\n" for d in tqdm(docs, total=args.docs, unit="doc")]
    except ValueError as err:
        p.error(str(err))
    path = args.out / "passkey.jsonl"
    write_output(path, "".join(lines))
    tokens = sum(len(tokenizer.encode(json.loads(line)["text"])) + 1 for line in lines)
    print(f"{len(lines)} passkey documents, {tokens:,} tokens of {args.encoding!r} with "
          f"end-of-text, written to {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
