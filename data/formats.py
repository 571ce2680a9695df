"""Local corpus files by format: which files a folder source holds, a cheap check of each
before any work, and the documents each holds, streamed.

    file                               documents
    .txt .md .rst .py                  the whole file is one document
    .jsonl                             one per line: the string under --text-field
    .parquet                           one per row: the string column --text-field
    any of the first two + .gz / .zst  the same, decompressed while reading

Parquet (https://parquet.apache.org/docs/file-format/) is read a batch of rows at a time;
gzip (RFC 1952, several members allowed) and Zstandard (RFC 8878, several frames allowed) are
decompressed as a stream. Memory is bounded by a batch or a line, never by the file, except
that a text file is one document and must fit in memory.

A null text (JSON `null`, a Parquet null) is a document without text: `file_documents`
yields None for it, and the caller skips it like an empty document (and counts it).

Every problem with a file is a one-line ValueError naming the file and, where there is one,
the line (JSONL, from 1) or row (Parquet, from 0).
"""

import codecs
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

PLAIN_SUFFIXES = (".txt", ".md", ".rst", ".py")  # one file, one document
COMPRESSIONS = (".gz", ".zst")
# What a folder source reads: these, and the first five compressed with COMPRESSIONS.
FOLDER_SUFFIXES = (*PLAIN_SUFFIXES, ".jsonl", ".parquet")
SNIFF_BYTES = 1 << 16  # how much of each file is checked before any work
SURROGATE = re.compile("[\ud800-\udfff]")
# Parquet rows per batch read: about 1-5 MB of typical web text. Arrow must also be told not
# to pre-buffer: by default it reads a row group's whole column chunk into memory at once
# (1 GB for a 1 GB row group); with pre_buffer off and a read buffer it reads page by page.
PARQUET_BATCH_ROWS = 1024
PARQUET_READ_BUFFER = 1 << 20
# Read errors of damaged compressed data: gzip raises EOFError for a truncated stream and
# BadGzipFile (an OSError, which prepare would report as a failing disk) for a bad header.
DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError)
ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE = 0x184D2A50  # the magic of a skippable frame, its low 4 bits masked


def file_format(path: Path) -> tuple[str, str]:
    """(kind, compression) of a corpus file, from its name: kind is "text", "jsonl" or
    "parquet", compression "", ".gz" or ".zst". A name prepare does not know is text."""
    name = path.name
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    suffix = Path(name[: len(name) - len(compression)]).suffix
    if suffix == ".parquet" and not compression:
        return "parquet", ""
    return ("jsonl" if suffix == ".jsonl" else "text"), compression


def is_corpus_file(path: Path) -> bool:
    """Whether a folder source reads this file (FOLDER_SUFFIXES, plain or compressed)."""
    _, compression = file_format(path)
    inner = Path(path.name[: len(path.name) - len(compression)]).suffix
    return inner in FOLDER_SUFFIXES and not (inner == ".parquet" and compression)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # Arrow's messages end in, and may hold, newlines


def _not_utf8(path: Path, e: UnicodeDecodeError, where: str = "") -> ValueError:
    return ValueError(
        f"{path}{where} is not UTF-8 text (byte {e.start}: {e.reason}); SOURCE files must be "
        "UTF-8 text: convert it (e.g. iconv) or leave it out"
    )


def _damaged(path: Path, compression: str, e: Exception, where: str) -> ValueError:
    kind = "gzip" if compression == ".gz" else "Zstandard"
    return ValueError(
        f"{path}: {kind} data is truncated or corrupt{where} ({_one_line(e)}); re-download or "
        "re-compress the file"
    )


def _check_zstd_frames(path: Path) -> None:
    """Walk the frame and block headers of a Zstandard file (RFC 8878, section 3.1) without
    decompressing: a truncated frame is an error before any work. zstandard's stream_reader
    would end quietly at one, dropping the rest of the corpus without a word."""
    with open(path, "rb", buffering=0) as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            start = pos
            head = os.pread(fd, 18, pos)  # magic and the longest frame header
            magic = int.from_bytes(head[:4], "little")
            if magic & ~0xF == ZSTD_SKIPPABLE:  # magic, 4-byte length, that many bytes
                pos += 8 + int.from_bytes(head[4:8], "little")  # past the end if cut short
            elif magic != ZSTD_MAGIC:
                raise ValueError(
                    f"{path}: not Zstandard data (no frame magic at byte {pos}); a .zst "
                    "SOURCE must be zstd-compressed text or JSONL"
                )
            else:
                try:
                    pos += zstandard.frame_header_size(head)
                    checksum = zstandard.get_frame_parameters(head).has_checksum
                except zstandard.ZstdError as e:
                    raise ValueError(
                        f"{path}: bad Zstandard frame header at byte {pos} ({_one_line(e)})"
                    ) from e
                last = False
                while not last and pos < size:
                    block = int.from_bytes(os.pread(fd, 3, pos), "little")
                    last, kind, length = block & 1, block >> 1 & 3, block >> 3
                    pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
                pos += 4 * checksum
                if not last:
                    pos = size + 1  # ended inside the blocks
            if pos > size:
                raise ValueError(
                    f"{path}: the Zstandard frame at byte {start} is cut short (the file ends "
                    f"at byte {size}): the file is truncated; re-download or re-compress it"
                )


def _open_binary(path: Path, compression: str) -> BinaryIO:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        # read_across_frames: a file of several frames (zstd -c a b, pzstd) is one stream.
        reader = zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader)
    return open(path, "rb")


def _parquet_text_column(path: Path, text_field: str):
    """The ParquetFile at `path`, checked to have a string column `text_field`."""
    import pyarrow as pa  # imported here: only Parquet needs it, and it takes 0.3 s
    import pyarrow.parquet as pq

    try:
        # Page CRCs, where the writer stored them, are checked: a flipped bit in an
        # uncompressed page would otherwise be read as text.
        parquet = pq.ParquetFile(
            path, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False, page_checksum_verification=True
        )
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({_one_line(e)})") from e
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ValueError(
            f"{path}: no column {text_field!r}; its columns: {', '.join(schema.names)}; "
            "name the one holding the text with --text-field"
        )
    kind = schema.field(text_field).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value) or pa.types.is_large_string(value)
            or pa.types.is_string_view(value)):  # fmt: skip
        raise ValueError(
            f"{path}: column {text_field!r} holds {kind}, not strings, in every row; name the "
            "column holding the text with --text-field"
        )
    return parquet


def check_file(path: Path, text_field: str = "text") -> bool:
    """Check a corpus file cheaply, before any work; returns False when it holds no text.

    Text and JSONL: the first 64 KiB (decompressed), which must be UTF-8 without a NUL byte
    (which text never holds: the usual sign of a binary file); a .zst file's frame headers
    (a truncated frame); Parquet: the footer, and that `text_field` is a string column.
    """
    kind, compression = file_format(path)
    if kind == "parquet":
        return _parquet_text_column(path, text_field).metadata.num_rows > 0
    try:
        if compression == ".zst":
            _check_zstd_frames(path)
        with _open_binary(path, compression) as f:
            head = f.read(SNIFF_BYTES)
            whole = not f.read(1)
    except DECOMPRESSION_ERRORS as e:
        raise _damaged(path, compression, e, " in its first 64 KiB") from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror}") from e
    if (nul := head.find(b"\0")) >= 0:
        raise ValueError(
            f"{path} looks binary (a NUL byte at offset {nul}{' decompressed' * bool(compression)}"
            "); SOURCE files must be UTF-8 text"
        )
    try:
        # A multi-byte character cut at the end of the head is not an error unless the file ends.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    return bool(head)


def read_text(path: Path) -> str:
    """A whole text file (plain, .gz or .zst) as one string, newlines as `open()` gives them
    (\\r\\n and \\r become \\n)."""
    _, compression = file_format(path)
    try:
        with _open_binary(path, compression) as f:
            data = f.read()
    except DECOMPRESSION_ERRORS as e:
        raise _damaged(path, compression, e, "") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    del data
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _jsonl_texts(path: Path, compression: str, text_field: str) -> Iterator[str | None]:
    lineno = 0
    try:
        with _open_binary(path, compression) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, e, f":{lineno}") from e
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
                if not isinstance(record, dict) or text_field not in record:
                    has = (
                        f"its keys: {', '.join(list(record)[:10])}"
                        if isinstance(record, dict)
                        else f"a JSON {type(record).__name__}, not an object"
                    )
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r} ({has})")
                text = record[text_field]
                if text is not None and not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: no string field {text_field!r} (it holds "
                        f"{type(text).__name__} {json.dumps(text)[:40]})"
                    )
                if text is not None and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        # JSON can escape lone surrogates ("\ud800"), which no tokenizer encodes.
                        text = SURROGATE.sub("\ufffd", text)
                yield text
    except DECOMPRESSION_ERRORS as e:
        raise _damaged(path, compression, e, f" after line {lineno}") from e


def _parquet_texts(path: Path, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa

    parquet = _parquet_text_column(path, text_field)
    row = 0  # of the next batch's first row, counting from 0
    try:
        batches = parquet.iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=[text_field], use_threads=False
        )
        for batch in batches:
            column = batch.column(0)
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # a writer that did not check its strings
                for i in range(len(column)):
                    try:
                        column[i].as_py()
                    except UnicodeDecodeError as e:
                        raise _not_utf8(path, e, f": row {row + i} (from 0)") from e
                raise
            yield from texts
            row += len(texts)
    except (pa.ArrowException, OSError) as e:
        # Damaged data (a corrupt compressed page, a bad page header) is a plain OSError
        # without an errno from Arrow; one with an errno is the disk's, not the file's, fault.
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"{path}: {e.strerror}") from e
        raise ValueError(f"{path}: unreadable Parquet data after row {row} ({_one_line(e)})") from e


def _identity(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_documents(path: Path, text_field: str = "text") -> Iterator[str | None]:
    """The documents of one corpus file, in order; None for a null text.

    A file that changed while it was read (a download still running, a file replaced) is a
    ValueError once read: what was read may be cut short. So is a .zst file whose last frame
    is cut short when it has been read, as `check_file` refuses one before any work (the
    file may have been replaced since): zstandard's reader ends quietly at such a frame.
    """
    kind, compression = file_format(path)
    before = _identity(path)
    if kind == "parquet":
        yield from _parquet_texts(path, text_field)
    elif kind == "jsonl":
        yield from _jsonl_texts(path, compression, text_field)
    else:
        yield read_text(path)
    if (after := _identity(path)) != before:
        raise ValueError(
            f"{path} changed while it was read ({before[2]:,} bytes then, {after[2]:,} now): "
            "wait until whatever writes it has finished, then run prepare again"
        )
    if compression == ".zst":
        _check_zstd_frames(path)
