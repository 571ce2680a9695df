"""Hugging Face tokenizer files for a model directory: GPT-2's byte-level BPE format.

``transformers.GPT2Tokenizer`` (``AutoTokenizer``) reads ``vocab.json`` (token string -> id)
and ``merges.txt`` (one BPE merge per line, highest priority first), with
``tokenizer_config.json`` and ``special_tokens_map.json`` naming the special tokens. Both
files are built here from our own tokenizers (gpt/data/tokenizer.py), never downloaded:

- token strings are the token's bytes through GPT-2's byte-to-unicode map (Radford et al.
  2019, the released ``encoder.py``), which gives each byte a printable character, so no
  token string holds a space or a newline and ``merges.txt`` splits on the space;
- tiktoken keeps ranks, not merges: the merge of a token is recovered by running BPE on its
  bytes with the ranks below its own, which ends in the two tokens whose merge gives it.
  In rank order these are GPT-2's merges in priority order, so ``transformers`` splits text
  into the same tokens as tiktoken.

``gpt2`` is written with its 50,000 merges; ``bytes`` (256 byte tokens + end-of-text) as the
same format with no merges, which splits text into single bytes. ``cl100k_base`` and
``o200k_base`` are not written: their pre-tokenization pattern differs from GPT-2's, which
``GPT2Tokenizer`` hard-codes, so the same files would split text differently.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from gpt.fileio import write_atomic

VOCAB = "vocab.json"
MERGES = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
FILES = (VOCAB, MERGES, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
CHECKSUMMED = (VOCAB, MERGES)  # what defines the tokens; the two JSON configs may be edited
SUPPORTED = ("gpt2", "bytes")


def unsupported(name: str) -> str | None:
    """Why no tokenizer files are written for encoding ``name``, or None when they are."""
    if name in SUPPORTED:
        return None
    return (
        f"encoding {name!r} splits text with another pattern than GPT-2's, which "
        f"transformers' GPT2Tokenizer hard-codes (written: {', '.join(SUPPORTED)})"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to characters: the 188 bytes that print
    as themselves in Latin-1 keep their code point, the 68 others (controls, space, DEL,
    no-break space, soft hyphen) take 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that tiktoken's ``ranks`` (token bytes -> rank) encode, in rank order:
    for each multi-byte token, the two tokens that BPE on its bytes, merging only pairs whose
    merge has a lower rank than the token, ends with. ValueError when a token is not
    reachable that way (the ranks are not a BPE vocabulary)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            # tiktoken's rule: merge the adjacent pair whose merge has the lowest rank
            best, at = rank, -1
            for i in range(len(parts) - 1):
                merged = ranks.get(parts[i] + parts[i + 1])
                if merged is not None and merged < best:
                    best, at = merged, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or any(part not in ranks for part in parts):
            raise ValueError(
                f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _ranks(name: str) -> tuple[dict[bytes, int], int]:
    """(token bytes -> id for every non-special token, end-of-text id) of encoding ``name``."""
    from gpt.data.tokenizer import get_tokenizer  # RuntimeError when the ranks are not cached

    tokenizer = get_tokenizer(name)
    if name == "bytes":
        return {bytes([b]): b for b in range(256)}, tokenizer.eot
    encoding = tokenizer.encoding
    # GPT-2's BPE tokens are ids 0 .. 50255; end-of-text, the only special token, is 50256
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(tokenizer.eot)}
    assert len(ranks) == tokenizer.eot == tokenizer.n_vocab - 1, f"{name}: unexpected ranks"
    return ranks, tokenizer.eot


@functools.cache  # once per process: every checkpoint of a run writes the same files
def _vocab_and_merges(name: str) -> tuple[str, str]:
    """The text of vocab.json and merges.txt of encoding ``name``."""
    from gpt.data.tokenizer import EOT_TEXT

    ranks, eot = _ranks(name)
    char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT_TEXT] = eot
    lines = [f"{text(left)} {text(right)}" for left, right in recover_merges(ranks)]
    merges = "\n".join(["#version: 0.2", *lines]) + "\n"
    return json.dumps(vocab, ensure_ascii=False) + "\n", merges


def write_tokenizer(path: str | Path, name: str, max_length: int) -> list[str]:
    """Write the tokenizer files of encoding ``name`` (one of SUPPORTED) into model directory
    ``path``, each atomically; returns their names. ``max_length`` (the model's context) is
    recorded as ``model_max_length``. The end-of-text string is the special token
    (bos = eos = unk) and, as in Hugging Face's GPT-2, is parsed as it in text."""
    from gpt.data.tokenizer import EOT_TEXT, get_tokenizer

    assert name in SUPPORTED, f"no tokenizer files for {name!r}: {unsupported(name)}"
    vocab, merges = _vocab_and_merges(name)
    eot = get_tokenizer(name).eot
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        # decode exactly what the ids spell: no space clean-up before punctuation
        "clean_up_tokenization_spaces": False,
        "errors": "replace",  # as tiktoken: an invalid UTF-8 sequence decodes to U+FFFD
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(eot): {
                "content": EOT_TEXT,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    path = Path(path)
    write_atomic(path / VOCAB, vocab)
    write_atomic(path / MERGES, merges)
    write_atomic(path / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
    write_atomic(path / SPECIAL_TOKENS_MAP, json.dumps(special, indent=2) + "\n")
    return list(FILES)
