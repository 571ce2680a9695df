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
