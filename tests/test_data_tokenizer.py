"""Tests for gpt.data.tokenizer: GPT-2 ids against known values, bytes round trips, errors.

The gpt2 tests need the ranks in the cache (`make assets`); without them they fail, saying so.
"""

import pytest

from gpt.data import tokenizer as tok
from gpt.data.tokenizer import get_tokenizer


def test_gpt2_known_ids():
    enc = get_tokenizer("gpt2")
    assert (enc.name, enc.n_vocab, enc.eot) == ("gpt2", 50257, 50256)
    assert enc.encode("Hello world") == [15496, 995]
    # Hand-checked GPT-2 ids: " the" is 262, a newline 198.
    assert enc.encode(" the\n") == [262, 198]
    # Ordinary text: the special-token string is split like any other text.
    assert 50256 not in enc.encode("<|endoftext|>")
    assert enc.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café ☃ 🦙", "a\n\tb  c\r\n"])
def test_round_trip(text):
    for name in ("bytes", "gpt2"):
        enc = get_tokenizer(name)
        ids = enc.encode(text)
        assert all(0 <= i < enc.n_vocab and i != enc.eot for i in ids)
        assert enc.decode(ids) == text


def test_bytes_tokenizer():
    enc = get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot) == (257, 256)
    assert enc.encode("hé") == [104, 195, 169]
    assert enc.decode([104, 256, 105]) == "h<|endoftext|>i"
    assert enc.encode_array("hé").tolist() == [104, 195, 169]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2, cl100k_base, o200k_base, bytes"):
        get_tokenizer("gpt3")


def test_missing_and_corrupt_ranks_say_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tok, "_CACHE", {})
    with pytest.raises(RuntimeError, match=r"python -m gpt\.data\.assets gpt2") as info:
        get_tokenizer("gpt2")
    assert str(tmp_path / "tokenizers" / "gpt2.tiktoken") in str(info.value)
    path = tok.ranks_path("gpt2")
    path.parent.mkdir(parents=True)
    path.write_text("SGVsbG8= 0\n")  # well-formed but not the verified file
    with pytest.raises(RuntimeError, match="sha256 must be 306cd27f"):
        get_tokenizer("gpt2")
    with pytest.raises(RuntimeError, match=r"python -m gpt\.data\.assets cl100k_base"):
        get_tokenizer("cl100k_base")


def test_encode_array_matches_encode():
    for name in ("bytes", "gpt2"):
        enc = get_tokenizer(name)
        text = "Hello <|endoftext|> wörld\n\n  x"
        assert enc.encode_array(text).tolist() == enc.encode(text)


@pytest.mark.parametrize(
    "name, n_vocab, eot, ids",
    [("cl100k_base", 100277, 100257, [15339, 1917]), ("o200k_base", 200019, 199999, [24912, 2375])],
)
def test_larger_encodings_when_cached(name, n_vocab, eot, ids):
    # Optional encodings (`python -m gpt.data.assets cl100k_base o200k_base`, 41 MB download).
    if not tok.ranks_path(name).exists():
        pytest.skip(f"{name} ranks not cached")
    enc = get_tokenizer(name)
    assert (enc.n_vocab, enc.eot, enc.encode("hello world")) == (n_vocab, eot, ids)
    assert enc.decode(enc.encode("naïve 🦙")) == "naïve 🦙"
