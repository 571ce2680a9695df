"""Tests for gpt.data.recipes: parsing and cleaning, on hand-made inputs.

Nothing downloads: the shakespeare test reads the cache filled by `make assets` and fails,
saying so, when it is empty.
"""

import pytest

from gpt.data import recipes
from gpt.data.assets import cache_dir


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
