"""Hugging Face tokenizer files in exports (gpt/convert/hf_tokenizer.py): transformers'
AutoTokenizer, loaded from an export, splits text into the ids our tokenizer gives, and
transformers' text-generation pipeline continues a prompt as our greedy decoding does."""

import json
import random

import pytest
import torch
import transformers
from test_convert import sharpen

from gpt import GPT, ModelConfig
from gpt.convert import hf_tokenizer
from gpt.convert.__main__ import main as convert_main
from gpt.data.tokenizer import EOT_TEXT, get_tokenizer
from gpt.generate import generate

transformers.logging.set_verbosity_error()
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
SAMPLES = [
    "Hello world",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "  leading spaces\n\n\ttabs   and\r\nCRLF  \n   \n",
    "12345 67 8.9e10 3,141,592 0x1F 007",
    "naïve café — 日本語のテキスト 🙂👍🏽 emoji, Ελληνικά, العربية, e\u0301\u0301",
    "'s 're 've 'll 'd 'm 't don't I'M",
    "\x00\x01\x7f\xa0\xad\u3000\u2028 controls and odd spaces",
    "x" * 300 + " " * 40 + "-" * 70,
    "",
]


def random_text(seed: int, n: int = 4000) -> str:
    """Characters from every class GPT-2's split pattern and byte map treat apart."""
    pool = (
        "abcXYZ019'.,;:!?-_()[]{}<>|/\\\"@#$%^&*+=~` \n\t\r\x0b\x0c\xa0"
        "éüßøñçÀÆ\u0301\u0308" + "日本語中文한국어" + "αβγжщ" + "🙂🚀👍🏽" + "\u200b\u2028\u3000"
    )
    rng = random.Random(seed)
    return "".join(rng.choice(pool) for _ in range(n))


def small_model(vocab_size: int, seed: int = 2) -> GPT:
    """A random GPT-2-shaped model whose greedy continuations vary: untied head and sharpened
    matrices (logit gaps far above float rounding)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False
    )
    model = GPT(cfg).eval()
    sharpen(model)
    return model


@pytest.fixture(scope="module", params=["gpt2", "bytes"])
def export(request, tmp_path_factory):
    """(encoding, its tokenizer, the model and the directory it was exported to)."""
    name = request.param
    ours = get_tokenizer(name)
    model = small_model(ours.n_vocab)
    path = tmp_path_factory.mktemp(name) / "export"
    assert model.save_pretrained(path, tokenizer=name) == "gpt2"
    return name, ours, model, path


def test_autotokenizer_gives_our_ids(export):
    name, ours, _, path = export
    assert TOKENIZER_FILES <= {p.name for p in path.iterdir()}
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert theirs.vocab_size == len(theirs) == ours.n_vocab  # 50257 for gpt2, 257 for bytes
    assert theirs.eos_token_id == theirs.bos_token_id == ours.eot
    assert theirs.model_max_length == 64  # the model's context
    for text in [*SAMPLES, random_text(0), random_text(1)]:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, repr(text[:60])
        assert theirs.decode(ids) == ours.decode(ids)
    broken = ours.encode("a🙂")[:-1]  # a split UTF-8 character: U+FFFD in both
    assert theirs.decode(broken) == ours.decode(broken) == "a\ufffd"


def test_end_of_text_in_text_is_the_special_token_unless_split(export):
    """As documented: transformers reads "<|endoftext|>" in text as the end-of-text id (as
    Hugging Face's GPT-2 does); split_special_tokens=True gives our encode's plain-text ids."""
    _, ours, _, path = export
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    text = f"one{EOT_TEXT}two {EOT_TEXT}"
    want = [*ours.encode("one"), ours.eot, *ours.encode("two "), ours.eot]
    assert theirs(text)["input_ids"] == want
    assert theirs(text, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert theirs.decode(want) == ours.decode(want) == text


def test_pipeline_continues_a_prompt_as_our_greedy_decoding(export):
    name, ours, model, path = export
    pipe = transformers.pipeline("text-generation", model=str(path), device="cpu")
    for prompt in ["Hello, world: naïve 123", "ROMEO:\n  But", "日本語 🙂 x"]:
        ids = ours.encode(prompt)
        want = generate(model, torch.tensor([ids]), 20, temperature=0)[0].tolist()
        if ours.eot in want[len(ids) :]:  # transformers stops after end-of-text; we do not
            want = want[: want.index(ours.eot, len(ids)) + 1]
        assert len(set(want[len(ids) :])) > 3, "a degenerate continuation tests little"
        got = pipe(prompt, max_new_tokens=20, do_sample=False, return_tensors=True)
        assert got[0]["generated_token_ids"] == want, name
        text = pipe(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
        assert text == ours.decode(want)


def test_merges_recovered_from_ranks_are_gpt2s():
    """A hand-worked vocabulary, and the properties of GPT-2's: 256 byte tokens, 50,000
    merges, each pair of earlier tokens making the token of its rank."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"bc", b"abcd", b"aa", b"aaaa"):
        ranks[token] = len(ranks)
    # "abcd": BPE with the ranks below its own merges a+b (the lowest), then ab+c, and stops
    # at (abc, d), although bc ranks below abcd too; "aaaa": the leftmost a+a, then a+a
    assert hf_tokenizer.recover_merges(ranks) == [
        (b"a", b"b"),
        (b"ab", b"c"),
        (b"b", b"c"),
        (b"abc", b"d"),
        (b"a", b"a"),
        (b"aa", b"aa"),
    ]
    with pytest.raises(ValueError, match=r"b'xyz' \(rank 262\) is not the merge of two"):
        hf_tokenizer.recover_merges({**ranks, b"xyz": 262})  # no xy or yz before it
    char = hf_tokenizer.bytes_to_unicode()
    assert len(set(char.values())) == 256
    assert char[ord("A")] == "A" and char[ord(" ")] == "Ġ" and char[ord("\n")] == "Ċ"
    assert not any(c.isspace() for c in char.values())


def test_the_files_hold_every_token_and_its_merge(export):
    name, ours, _, path = export
    vocab = json.loads((path / "vocab.json").read_text())
    lines = (path / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version")
    assert sorted(vocab.values()) == list(range(ours.n_vocab)) and vocab[EOT_TEXT] == ours.eot
    assert len(lines) - 1 == (50000 if name == "gpt2" else 0)
    for rank, line in enumerate(lines[1:], start=256):
        left, right = line.split(" ")
        assert vocab[left + right] == rank and vocab[left] < rank and vocab[right] < rank
    sums = json.loads((path / "checksums.json").read_text())
    assert {"model.safetensors", "vocab.json", "merges.txt"} == set(sums)


def test_an_encoding_the_format_cannot_hold_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    """cl100k_base and o200k_base split text with their own pattern; GPT2Tokenizer cannot."""
    assert hf_tokenizer.unsupported("gpt2") is hf_tokenizer.unsupported("bytes") is None
    assert "pattern" in hf_tokenizer.unsupported("cl100k_base")
    # their ranks are not cached here: only the end-of-text id is needed from them
    monkeypatch.setattr("gpt.convert.eos_token_id", lambda cfg, name: 100257)
    small_model(257).save_pretrained(tmp_path / "src", tokenizer="cl100k_base")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "note: no tokenizer files written" in out and "cl100k_base" in out
    assert not TOKENIZER_FILES & {p.name for p in (tmp_path / "out").iterdir()}


def test_a_source_without_tokenizer_leaves_no_stale_tokenizer_files(tmp_path, capsys):
    small_model(257).save_pretrained(tmp_path / "bytes", tokenizer="bytes")
    assert convert_main([str(tmp_path / "bytes"), str(tmp_path / "out")]) == 0
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "note" not in capsys.readouterr().out
    small_model(257, seed=3).save_pretrained(tmp_path / "none")  # no tokenizer recorded
    assert convert_main([str(tmp_path / "none"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "note: no tokenizer files written" in out and "records no tokenizer" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checksums.json",
        "config.json",
        "model.safetensors",
    ]
    GPT.from_pretrained(tmp_path / "out")  # its checksums list no tokenizer file any more
