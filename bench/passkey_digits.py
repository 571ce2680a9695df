"""How far a model is from copying the pass key: teacher-forced accuracy of each digit of
the key's three copies in fresh answered passkey documents.

    python bench/passkey_digits.py --ckpt out/long-context/base --length 128

In a document `... The pass key is 48213. Remember it. 48213 is the pass key. ... The pass
key is 48213.` the first copy cannot be predicted (chance: about 10% a digit), the second
is a copy from 13 characters back and the answer one from up to a whole document back. Each
digit is right when the model's most likely next token, given the true document before it,
is that digit. Greedy passkey accuracy (`python -m gpt.eval.passkey`) is all five answer
digits right at once; this shows the circuit forming long before that is above 0%.
Byte-level models only (one token per digit). docs/long-context.md's table of what taught
the base the skill was measured with it.
"""

from __future__ import annotations

import argparse

import torch

from gpt import store
from gpt.data.passkey import KEY_DIGITS, passkey_documents
from gpt.data.tokenizer import get_tokenizer


def digit_accuracy(model, tokenizer, length: int, docs: int, seed: int) -> list[list[float]]:
    """[first copy, second copy, answer] x KEY_DIGITS accuracies over ``docs`` documents of
    ``length - 4`` to ``length`` tokens."""
    hits = [[0] * KEY_DIGITS for _ in range(3)]
    for doc in passkey_documents(tokenizer, docs, length, length - 4, seed=seed):
        ids = tokenizer.encode(doc)
        key = doc.rsplit(" ", 1)[1].rstrip(".")
        with torch.no_grad():
            out = model(torch.tensor([ids[:-1]]))
        logits = out[0] if isinstance(out, tuple) else out  # (1, T, V)
        predicted = logits[0].argmax(-1)
        starts = [i for i in range(len(doc)) if doc.startswith(key, i)]  # bytes: i is a token
        for copy, start in enumerate(starts[:3]):
            for d in range(KEY_DIGITS):
                hits[copy][d] += int(predicted[start + d - 1] == ids[start + d])
    return [[h / docs for h in row] for row in hits]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/passkey_digits.py", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a run, checkpoint or model directory")
    p.add_argument("--length", type=int, default=128, help="document length in tokens")
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--seed", type=int, default=99, help="not a seed the training data used")
    args = p.parse_args(argv)
    name = store.tokenizer_of(args.ckpt) or "gpt2"
    if name != "bytes":
        p.error(f"--ckpt {args.ckpt}: tokenizer {name!r}; this counts digits as bytes")
    model = store.load_model(args.ckpt, attention="naive").eval()
    rows = digit_accuracy(model, get_tokenizer(name), args.length, args.docs, args.seed)
    for label, row in zip(("first copy", "second copy", "answer"), rows, strict=True):
        print(f"{label:11s} " + " ".join(f"{a:.2f}" for a in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
