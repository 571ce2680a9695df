"""A minimal reader for R lazy-load databases (`NAME.rdx` + `NAME.rdb`), enough for text data.

Implements the XDR ("X\\n") binary form of R's serialization format, versions 2 and 3 (see
"R Internals", section "Serialization Formats", and src/main/serialize.c), for the types that
hold data: NULL, symbols, pairlists, character, logical, integer and double vectors, lists.
The `.rdx` index is a gzip-compressed serialized list whose `variables` entry maps each object
name to (offset, length) in the `.rdb` file; each `.rdb` record is a 4-byte big-endian length
followed by a zlib stream of one serialized object. R itself is not needed.
"""

import gzip
import struct
import zlib
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = (
    0,
    1,
    2,
    9,
    10,
    13,
    14,
    16,
    19,
)
REFSXP, NILVALUE_SXP = 255, 254
LATIN1_MASK, NA_INTEGER = 1 << 2, -(2**31)


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where, self.refs = data, 0, where, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.where}: truncated R serialization at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError(f"{self.where}: not R's XDR serialization format")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"{self.where}: R serialization version {version}, expected 2 or 3")

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == LISTSXP:  # pairlist: (attributes) (tag) car cdr
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            del attrs
            head = [(tag, self.item())]
            rest = self.item()
            return head + (rest or [])
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            return raw.decode("latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8")
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            value = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.int())]
        elif kind == NILSXP:
            value = None
        else:
            raise ValueError(f"{self.where}: unsupported R object type {kind} at byte {self.pos}")
        if has_attr:
            attrs = dict(self.item())
            if isinstance(value, list) and "names" in attrs:
                return dict(zip(attrs["names"], value, strict=True))
        return value


def unserialize(data: bytes, where: str):
    """One R object from its XDR serialization; vectors become lists, named ones dicts."""
    reader = _Reader(data, where)
    reader.header()
    return reader.item()


def read_lazyload(stem: Path) -> dict:
    """Every object of the lazy-load database `stem`.rdx/.rdb, by name."""
    rdx, rdb = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    raw = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = raw[offset : offset + length]
        expected = struct.unpack(">I", record[:4])[0]
        data = zlib.decompress(record[4:])
        if len(data) != expected:
            raise ValueError(f"{rdb}: object {name!r} is {len(data)} bytes, expected {expected}")
        objects[name] = unserialize(data, f"{rdb}:{name}")
    return objects
