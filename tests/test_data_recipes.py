"""Tests for gpt.data.recipes and gpt.data.rdata: parsing and cleaning, on hand-made inputs.

Nothing downloads: the shakespeare test reads the cache filled by `make assets` and fails,
saying so, when it is empty.
"""

import gzip
import struct
import zlib

import pytest

from gpt.data import recipes
from gpt.data.assets import cache_dir
from gpt.data.rdata import read_lazyload, unserialize


# A hand-written R XDR serializer for the few types the reader needs (R Internals, 1.8).
def r_int(i):
    return struct.pack(">i", i)


def r_char(s, latin1=False):
    if s is None:
        return r_int(9) + r_int(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    return r_int(9 | ((4 if latin1 else 8) << 12)) + r_int(len(raw)) + raw


def r_strings(items):
    return r_int(16) + r_int(len(items)) + b"".join(r_char(*i) for i in items)


def r_named_list(named):
    # VECSXP with a "names" attribute: pairlist(tag=symbol "names", value=STRSXP).
    body = r_int(19 | 1 << 9) + r_int(len(named)) + b"".join(named.values())
    names = r_strings([(n,) for n in named])
    attr = r_int(2 | 1 << 10) + r_int(1) + r_char("names") + names + r_int(254)
    return body + attr


def r_ints(values):
    return r_int(13) + r_int(len(values)) + b"".join(r_int(v) for v in values)


def serialized(body, version=3):
    head = b"X\n" + r_int(version) + r_int(0x40300) + r_int(0x30500)
    return head + (r_int(5) + b"UTF-8" if version == 3 else b"") + body


def test_unserialize_strings_and_named_lists():
    data = serialized(r_strings([("a",), (None,), ("café", True), ("☃",)]))
    assert unserialize(data, "x") == ["a", None, "café", "☃"]
    data = serialized(r_named_list({"one": r_ints([1, 2]), "two": r_strings([("b",)])}), 2)
    assert unserialize(data, "x") == {"one": [1, 2], "two": ["b"]}
    with pytest.raises(ValueError, match="x: not R's XDR"):
        unserialize(b"A\n" + data[2:], "x")
    with pytest.raises(ValueError, match="x: truncated R serialization"):
        unserialize(data[:-3], "x")


def test_read_lazyload(tmp_path):
    objects = {"book": r_strings([("Line one",), ("",)]), "other": r_strings([("z",)])}
    rdb, offsets = b"", {}
    for name, body in objects.items():
        payload = serialized(body)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = r_ints([len(rdb), len(record)])
        rdb += record
    index = r_named_list({"variables": r_named_list(offsets), "compressed": r_ints([1])})
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(serialized(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert read_lazyload(tmp_path / "Rdata") == {"book": ["Line one", ""], "other": ["z"]}


def test_austen_documents_join_lines(tmp_path, monkeypatch):
    novels = {name: [name.upper(), "", "text", None] for name in recipes.AUSTEN_BOOKS}
    monkeypatch.setattr(recipes, "fetch_austen", lambda: tmp_path)
    monkeypatch.setattr(recipes, "read_lazyload", lambda stem: novels)
    docs = list(recipes.austen_documents())
    assert docs[0] == "SENSESENSIBILITY\n\ntext\n\n" and len(docs) == 6


def test_kjv_verse_prefixes_removed_one_document_per_book(tmp_path, monkeypatch):
    text = tmp_path / "kjv.txt"
    text.write_text(
        "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n"
        "1Sm1:1 Now there was a man.\nRev22:21 The grace. Amen.\n"
    )
    monkeypatch.setattr(recipes, "fetch_kjv", lambda: text)
    assert list(recipes.kjv_documents()) == [
        "In the beginning.\nAnd the earth.\n\nThus the heavens.\n",
        "Now there was a man.\n",
        "The grace. Amen.\n",
    ]
    text.write_text("Ge1:1 fine\nnot a verse\n")
    with pytest.raises(ValueError, match="kjv.txt: unexpected line 'not a verse'"):
        list(recipes.kjv_documents())


def test_pystdlib_skips_tests_and_reads_sources():
    root = recipes.fetch_pystdlib()
    first = next(recipes.pystdlib_documents())
    assert first == sorted(root.rglob("*.py"))[0].read_text(encoding="utf-8")
    assert "test" in recipes.STDLIB_SKIP and "site-packages" in recipes.STDLIB_SKIP


def test_shakespeare_from_the_cache():
    stamp = cache_dir() / "corpora" / "shakespeare" / "VERIFIED"
    if not stamp.exists():
        pytest.fail(f"{stamp} missing: run `make assets` (tests never download)")
    docs = list(recipes.shakespeare_documents())
    assert len(docs) == 42 and sum(len(d.encode()) for d in docs) == 5_057_198
    assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'tinystories'; valid: austen, kjv"):
        recipes.fetch_recipe("tinystories")
