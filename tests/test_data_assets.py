"""Tests for gpt.data.assets: the cache location and the fetch command line."""

from pathlib import Path

import pytest

from gpt.data import assets


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT_CACHE_DIR", raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "gpt-pretrain"
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    assert assets.cache_dir() == tmp_path


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as info:
        assets.main(["tinystories"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown asset 'tinystories'" in err and "gpt2" in err and "shakespeare" in err


def test_missing_tool_is_a_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setattr(assets.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="`apt-get` not found: fetching Debian package kjv"):
        assets.apt_download("kjv", tmp_path)


def test_cli_failed_fetch_exits_1_without_traceback(monkeypatch, capsys):
    from gpt.data import tokenizer

    def offline(name):
        raise RuntimeError("could not download openai-whisper==20250625 from PyPI")

    monkeypatch.setattr(tokenizer, "fetch_ranks", offline)
    with pytest.raises(SystemExit) as info:
        assets.main(["gpt2"])
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        "python -m gpt.data.assets: error: gpt2: could not download openai-whisper==20250625 "
        "from PyPI\n"
    )
