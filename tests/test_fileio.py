"""gpt.fileio: atomic writes leave the old file or the new one, never a part; checksums."""

import os

import pytest

from gpt import fileio


def test_write_atomic_and_sha256(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    fileio.write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc" and not list(path.parent.glob("*.tmp"))
    # sha256("abc"), FIPS 180-2 appendix B.1
    assert fileio.sha256_file(path).startswith("ba7816bf8f01cfea414140de5dae2223")
    fileio.write_atomic(path, "d\u00e9f")  # text is written as UTF-8
    assert path.read_bytes() == "d\u00e9f".encode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    fileio.write_atomic(path, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_atomic(path, "new")
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))
