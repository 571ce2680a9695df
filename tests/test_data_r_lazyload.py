"""Tests for gpt.data.r_lazyload: R lazy-load databases written by hand, read back."""

import gzip
import struct
import zlib

import pytest

from gpt.data.r_lazyload import read_lazyload, unserialize


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
