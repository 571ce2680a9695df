"""Tests for gpt.data.shards: the documented byte layout, and every validation error."""

import json
import struct
import zlib

import numpy as np
import pytest

from gpt.data.shards import (
    ShardWriter,
    open_shard,
    open_split,
    read_header,
    read_manifest,
    token_dtype,
    write_manifest,
)


def write_split(tmp_path, tokens, n_vocab=257, shard_tokens=10, encoding="bytes"):
    writer = ShardWriter(tmp_path, "train", encoding, n_vocab, shard_tokens)
    writer.write(np.asarray(tokens))
    return writer.close()


def test_layout_matches_documentation(tmp_path):
    # Parse by hand from the README/module description, independently of read_header.
    tokens = np.arange(25) * 7
    entries = write_split(tmp_path, tokens)
    assert [e["tokens"] for e in entries] == [10, 10, 5]
    raw = (tmp_path / "train_000002.bin").read_bytes()
    assert raw[:8] == b"GPTSHARD"
    version, itemsize, count, crc, n_vocab = struct.unpack("<IIQII", raw[8:32])
    assert (version, itemsize, count, n_vocab) == (1, 2, 5, 257)
    assert raw[32:64] == b"bytes" + bytes(27)
    payload = raw[64:]
    assert crc == zlib.crc32(payload) and entries[2]["crc32"] == f"{crc:08x}"
    assert [int.from_bytes(payload[i : i + 2], "little") for i in range(0, 10, 2)] == list(
        tokens[20:]
    )
    assert open_shard(tmp_path / "train_000000.bin").tolist() == list(tokens[:10])
    assert not list(tmp_path.glob("*.tmp"))


def test_uint32_when_vocab_exceeds_16_bits(tmp_path):
    assert token_dtype(50257) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4") and token_dtype(200019) == np.dtype("<u4")
    write_split(tmp_path, [0, 70000, 199999], n_vocab=200019, encoding="o200k_base")
    header = read_header(tmp_path / "train_000000.bin")
    assert (header.itemsize, header.count, header.encoding) == (4, 3, "o200k_base")
    assert open_shard(tmp_path / "train_000000.bin").tolist() == [0, 70000, 199999]


@pytest.mark.parametrize("cut", [1, 3, 4, 5])
def test_truncated_shard_names_file(tmp_path, cut):
    write_split(tmp_path, np.arange(10))
    path = tmp_path / "train_000000.bin"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ValueError, match=rf"{path}.*expected 84 .*truncated"):
        read_header(path)


def test_short_header(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"GPTSHARD")
    with pytest.raises(ValueError, match=rf"{path}: 8 bytes, shorter than the 64-byte header"):
        read_header(path)


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (0, b"XPTSHARD", "bad magic"),
        (8, struct.pack("<I", 2), "format version 2"),
        (12, struct.pack("<I", 3), "bytes per token 3"),
        (70, b"\xff", "CRC-32"),
        (28, struct.pack("<I", 100), "token id 199 >= vocabulary size 100"),
    ],
)
def test_corrupt_shard_names_file(tmp_path, offset, value, message):
    write_split(tmp_path, np.arange(190, 200))
    path = tmp_path / "train_000000.bin"
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message) as info:
        open_shard(path)
    assert str(path) in str(info.value)


def test_token_out_of_vocab_with_valid_crc(tmp_path):
    # A writer bug rather than bit rot: the CRC is right but an id is too big.
    write_split(tmp_path, [1, 2, 300, 4], n_vocab=257)
    for verify in ("full", "sample"):
        with pytest.raises(ValueError, match="token id 300 >= vocabulary size 257"):
            open_shard(tmp_path / "train_000000.bin", verify)


def test_missing_file_dir_and_manifest(tmp_path):
    with pytest.raises(ValueError, match=rf"shard {tmp_path / 'nope.bin'} does not exist"):
        open_shard(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'missing'} does not exist"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'manifest.json'} not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_checks(tmp_path):
    entries = write_split(tmp_path, np.arange(15))
    manifest = {
        "format": "gpt-pretrain-shards",
        "version": 1,
        "encoding": "bytes",
        "n_vocab": 257,
        "eot": 256,
        "splits": {
            "train": {"documents": 1, "tokens": 15, "shards": entries},
            "val": {"documents": 0, "tokens": 0, "shards": []},
        },
    }
    write_manifest(tmp_path, manifest)
    assert [len(a) for a in open_split(tmp_path, "train")] == [10, 5]
    assert open_split(tmp_path, "val") == []
    with pytest.raises(ValueError, match="no split 'test'; has \\['train', 'val'\\]"):
        open_split(tmp_path, "test")
    # A shard replaced after the manifest was written is caught by count/CRC.
    write_split(tmp_path, np.arange(1, 16))
    with pytest.raises(ValueError, match="train_000000.bin: header .* manifest says"):
        open_split(tmp_path, "train")
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 9}))
    with pytest.raises(ValueError, match="manifest.json: version 9, this reader reads 1"):
        read_manifest(tmp_path)
