"""gpt/train/engine.py: where DeepSpeed's just-in-time op build goes."""

import sys
from pathlib import Path

from gpt.train import engine


def test_the_op_build_stays_with_the_installation(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    engine.use_own_extensions_dir()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def test_a_directory_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    engine.use_own_extensions_dir()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)
