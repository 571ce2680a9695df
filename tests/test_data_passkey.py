"""Passkey prompts and documents (gpt/data/passkey.py): exact fit in tokens of both kinds of
tokenizer, the key sentence at its depth within one sentence, keys, determinism, and the
documents prepare mixes in."""

import json

import pytest

from gpt.data import passkey
from gpt.data.passkey import (
    ANSWER,
    FILLER,
    KEY_SENTENCE,
    QUESTION,
    draw_keys,
    passkey_prompt,
    passkey_text,
    shortest_length,
)
from gpt.data.prepare import prepare
from gpt.data.shards import read_manifest
from gpt.data.tokenizer import get_tokenizer

ENCODINGS = ("bytes", "gpt2")
DEPTHS = (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0)


@pytest.fixture(scope="module", params=ENCODINGS)
def tokenizer(request):
    return get_tokenizer(request.param)


def sentence_tokens(tokenizer) -> int:
    """The most tokens one filler sentence adds, as it appears after another."""
    return max(len(tokenizer.encode(" " + s)) for s in FILLER)


@pytest.mark.parametrize("length", [110, 128, 333, 1000])
@pytest.mark.parametrize("depth", DEPTHS)
def test_prompt_fills_the_length_and_puts_the_key_at_its_depth(tokenizer, length, depth):
    key = "48213"
    p = passkey_prompt(tokenizer, length, depth, key)
    answer = len(tokenizer.encode(f" {key}."))
    assert p.ids == tokenizer.encode(p.text) and p.answer_tokens == answer
    assert len(p.ids) + answer <= length
    # the longest that fits: one more sentence would not
    longer = passkey_text(p.sentences + 1, round(depth * (p.sentences + 1)), key)
    assert len(tokenizer.encode(longer)) + answer > length
    assert (
        p.text.endswith(" " + QUESTION) or p.text == KEY_SENTENCE.format(key=key) + " " + QUESTION
    )
    assert p.text.count(key) == 2 and p.text.count("pass key is") == 2
    # the key sentence starts at token key_token (a BPE token may carry the space before it)
    assert tokenizer.decode(p.ids[p.key_token :]).lstrip().startswith(f"The pass key is {key}.")
    assert not tokenizer.decode(p.ids[p.key_token + 1 :]).lstrip().startswith("The pass key")
    # its depth in tokens of filler, within one sentence
    assert abs(p.key_token - depth * p.filler_tokens) <= sentence_tokens(tokenizer)
    assert p.key_index == round(depth * p.sentences)


def test_depth_zero_and_one_are_the_ends(tokenizer):
    first = passkey_prompt(tokenizer, 300, 0.0, "11111")
    last = passkey_prompt(tokenizer, 300, 1.0, "11111")
    assert first.text.startswith(KEY_SENTENCE.format(key="11111"))
    assert last.text.endswith(KEY_SENTENCE.format(key="11111") + " " + QUESTION)
    assert first.key_token == 0 and last.key_index == last.sentences


def test_filler_sentences_cycle_in_order():
    text = passkey_text(7, 3, "12345")
    sentences = [s + "." for s in text.split(". ")]
    assert sentences[:3] == list(FILLER[:3])
    assert sentences[3:6] == ["The pass key is 12345.", "Remember it.", "12345 is the pass key."]
    assert sentences[6:9] == [*FILLER[3:], FILLER[0]]


def test_keys_are_distinct_five_digit_numbers_and_seeded():
    keys = draw_keys(1000, "a")
    assert len(set(keys)) == 1000
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)
    assert keys == draw_keys(1000, "a") and keys != draw_keys(1000, "b")
    assert draw_keys(10, 3) == draw_keys(10, "3")


def test_shortest_length_fits_every_key_and_too_short_is_refused(tokenizer):
    low = shortest_length(tokenizer)
    for key in draw_keys(200, "short") + ["10000", "99999"]:
        p = passkey_prompt(tokenizer, low, 0.5, key)
        assert len(p.ids) + p.answer_tokens <= low
        assert p.sentences == 0 or tokenizer.name != "bytes"  # a bound for BPE, exact for bytes
    with pytest.raises(ValueError, match="too short for a passkey prompt"):
        passkey_prompt(tokenizer, low - 2 * 5 - 1, 0.5, "12345")
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        passkey_prompt(tokenizer, 200, 1.5, "12345")


def test_shortest_length_of_bytes_is_exact():
    tok = get_tokenizer("bytes")
    assert shortest_length(tok) == len(passkey_text(0, 0, "12345") + ANSWER.format(key="12345"))


def write(tmp_path, *args):
    out = tmp_path / "pk"
    assert passkey.main(["--out", str(out), *map(str, args)]) == 0
    return out / "passkey.jsonl"


def test_documents_are_answered_prompts_that_prepare_mixes(tmp_path, capsys):
    path = write(tmp_path, "--docs", 40, "--max-length", 180, "--encoding", "bytes")
    assert "40 passkey documents" in capsys.readouterr().out
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(docs) == 40
    low = shortest_length(get_tokenizer("bytes"))
    for doc in docs:
        prompt, answer = doc.rsplit(" ", 1)
        key = answer.removesuffix(".")
        assert prompt.endswith(QUESTION) and KEY_SENTENCE.format(key=key) in prompt
        assert low <= len(doc.encode()) <= 180  # exact for bytes
    assert len({len(d) for d in docs}) >= 4  # lengths vary (by whole sentences)
    # the same seed writes the same file; another seed another
    assert write(tmp_path / "again", "--docs", 40, "--max-length", 180, "--encoding",
                 "bytes").read_bytes() == path.read_bytes()  # fmt: skip
    other = write(tmp_path / "other", "--docs", 40, "--max-length", 180, "--encoding", "bytes",
                  "--seed", 1)  # fmt: skip
    assert other.read_bytes() != path.read_bytes()
    # prepare takes the folder beside another source: every document, end-of-text after each
    words = tmp_path / "words.txt"
    words.write_text("the cat sat on the mat " * 20)
    manifest = prepare([str(words), str(path.parent)], tmp_path / "mixed", encoding="bytes",
                       val_fraction=0.1, progress=False)  # fmt: skip
    assert manifest == read_manifest(tmp_path / "mixed")
    counts = manifest["splits"]
    assert sum(s["documents"] for s in counts.values()) == 41


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--docs", 5, "--max-length", 20, "--encoding", "bytes"], "--max-length 20"),
        (["--docs", 5, "--max-length", 200, "--min-length", 30, "--encoding", "bytes"],
         "--min-length 30"),
        (["--docs", 0, "--max-length", 200], "--docs"),
        (["--docs", 5, "--max-length", 200, "--encoding", "nope"], "--encoding 'nope'"),
    ],
)  # fmt: skip
def test_refusals_name_the_flag(tmp_path, capsys, args, flag):
    with pytest.raises(SystemExit) as exit:
        passkey.main(["--out", str(tmp_path), *map(str, args)])
    assert exit.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "passkey.jsonl").exists()
