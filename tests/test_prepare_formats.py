"""prepare on Parquet and on gzip- and zstd-compressed text and JSONL (gpt.data.formats): the
same documents give the same shards as plain JSONL and text, for any number of workers, with
or without --dedup; null texts are skipped and counted; every damaged input is a one-line
error (status 2) naming the file and the line, row or column, with DIR untouched."""

import gzip
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gpt.data import prepare as prepare_module
from gpt.data.formats import check_file, file_documents, file_format, is_corpus_file
from gpt.data.prepare import main, prepare
from gpt.data.recipes import resolve_source
from gpt.data.shards import read_manifest

OPTIONS = dict(encoding="bytes", val_fraction=0.25, shard_tokens=40, progress=False, fetch=False)


def corpus(n: int = 30) -> list[str]:
    """Documents with multi-byte characters, blank lines and one exact repeat (for --dedup)."""
    rng = np.random.default_rng(0)
    words = ["the", "naïve", "☃", "\n", "zebra", "🦙", "end.", "\t", "\n\n", "x"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(n)]
    docs[7] = docs[3]
    return docs


def jsonl_bytes(texts: list, field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


def zstd_frame_list(data: bytes) -> list[bytes]:
    """`data` as four Zstandard frames (as `zstd -c a b` or pzstd write several): one with
    its content size, one streamed (no size) with a checksum, a skippable frame, one more."""
    third = len(data) // 3 + 1
    streamed = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    middle = streamed.compressobj()
    skippable = (0x184D2A5A).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    return [
        zstandard.ZstdCompressor(level=3).compress(data[:third]),
        middle.compress(data[third : 2 * third]) + middle.flush(),
        skippable,
        zstandard.ZstdCompressor().compress(data[2 * third :]),
    ]


def zstd_frames(data: bytes) -> bytes:
    return b"".join(zstd_frame_list(data))


def write_parquet(path: Path, texts: list, field: str = "content", rows_per_group: int = 7):
    table = pa.table({"id": np.arange(len(texts)), field: pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=rows_per_group)


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus as plain JSONL and as one .txt file per document, each prepared once, with
    and without --dedup."""
    root = tmp_path_factory.mktemp("reference")
    docs = corpus()
    (root / "docs.jsonl").write_bytes(jsonl_bytes(docs))
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    made = {}
    for dedup in (False, True):
        for kind, source, field in (("jsonl", "docs.jsonl", "text"), ("text", "txt", "text")):
            out = root / f"{kind}-{dedup}"
            manifest = prepare([str(root / source)], out, text_field=field, dedup=dedup, **OPTIONS)
            made[kind, dedup] = manifest, shards(out)
    return docs, made


def write_jsonl_formats(folder: Path, docs: list[str]) -> None:
    raw = jsonl_bytes(docs, "content")
    (folder / "docs.jsonl.gz").write_bytes(gzip.compress(raw[:50]) + gzip.compress(raw[50:]))
    (folder / "docs.jsonl.zst").write_bytes(zstd_frames(raw))
    write_parquet(folder / "docs.parquet", docs)


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("name", ["docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet"])
def test_each_record_format_gives_the_jsonl_shards(reference, tmp_path, name, dedup):
    """One row or line = one document: the shards equal plain JSONL's byte for byte, with a
    non-default --text-field, a Parquet file of several row groups, multi-member gzip and
    multi-frame zstd; --dedup removes the same repeat."""
    docs, made = reference
    write_jsonl_formats(tmp_path, docs)
    assert pq.ParquetFile(tmp_path / "docs.parquet").metadata.num_row_groups == 5
    out = tmp_path / "out"
    manifest = prepare([str(tmp_path / name)], out, text_field="content", dedup=dedup, **OPTIONS)
    expected, expected_shards = made["jsonl", dedup]
    assert shards(out) == expected_shards and len(expected_shards) > 4
    assert manifest["splits"] == expected["splits"]
    assert manifest.get("dedup") == expected.get("dedup")
    assert not dedup or manifest["dedup"]["removed_documents"] >= 1  # docs[7] at least


@pytest.mark.parametrize("suffix", [".txt.gz", ".txt.zst"])
def test_compressed_text_files_give_the_text_shards(reference, tmp_path, suffix):
    """A compressed text file is one document, as the .txt it decompresses to, newlines
    included (\\r\\n read as \\n, as open() reads a .txt file)."""
    docs, made = reference
    compress = gzip.compress if suffix == ".txt.gz" else zstd_frames
    for i, doc in enumerate(docs):
        (tmp_path / f"{i:03d}{suffix}").write_bytes(compress(doc.encode()))
    out = tmp_path / "out"
    prepare([str(tmp_path)], out, **OPTIONS)
    assert shards(out) == made["text", False][1]
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")
    (tmp_path / f"crlf{suffix}").write_bytes(compress(b"one\r\ntwo\rthree\n"))
    assert [*file_documents(tmp_path / "crlf.txt")] == ["one\ntwo\nthree\n"]
    assert [*file_documents(tmp_path / f"crlf{suffix}")] == ["one\ntwo\nthree\n"]


def test_a_folder_of_every_format_is_identical_for_one_and_two_workers(tmp_path, monkeypatch):
    """Folders read every format (and nothing else), in sorted order; tiny batches, so that
    many are in flight and finish out of order."""
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 30)
    docs = corpus(40)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_jsonl_formats(src / "sub", docs[:20])
    (src / "a.txt.zst").write_bytes(zstd_frames(docs[20].encode()))
    (src / "b.txt.gz").write_bytes(gzip.compress(docs[21].encode()))
    (src / "c.md").write_text(docs[22])
    (src / "d.jsonl").write_bytes(jsonl_bytes(docs[23:], "content"))
    for ignored in ("e.tar.gz", "f.parquet.gz", "g.zst.txt.bak", "h.bin"):
        (src / ignored).write_bytes(b"\0\1\2")
    found = [p.relative_to(src).as_posix() for p in resolve_source(str(src))]
    assert found == ["a.txt.zst", "b.txt.gz", "c.md", "d.jsonl", "sub/docs.jsonl.gz",
                     "sub/docs.jsonl.zst", "sub/docs.parquet"]  # fmt: skip
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"out{workers}"
        prepare([str(src)], outs[workers], workers=workers, text_field="content", **OPTIONS)
    assert shards(outs[1]) == shards(outs[2]) and len(shards(outs[1])) > 10
    m1, m2 = read_manifest(outs[1]), read_manifest(outs[2])
    assert m1 == m2 and m1["splits"]["train"]["documents"] + m1["splits"]["val"]["documents"] == (
        3 * 20 + 3 + len(docs[23:])
    )


def test_null_texts_are_skipped_and_counted_like_empty_documents(reference, tmp_path, capsys):
    """FineWeb-style data has the odd null: in Parquet and JSONL alike it is a document
    without text, skipped like an empty one; the manifest and the summary count both."""
    docs, made = reference
    holes = [None, *docs[:10], "", None, *docs[10:], None]
    write_parquet(tmp_path / "nulls.parquet", holes, rows_per_group=4)
    (tmp_path / "nulls.jsonl.zst").write_bytes(zstd_frames(jsonl_bytes(holes, "content")))
    for name in ("nulls.parquet", "nulls.jsonl.zst"):
        out = tmp_path / name.split(".", 1)[1]
        main([str(tmp_path / name), "--out", str(out), "--encoding", "bytes", "--text-field",
              "content", "--val-fraction", "0.25", "--shard-tokens", "40"])  # fmt: skip
        assert "skipped: 1 empty and 3 null documents\n" in capsys.readouterr().out
        manifest = read_manifest(out)
        assert manifest["skipped"] == {"empty": 1, "null": 3}
        assert shards(out) == made["jsonl", False][1]
        assert manifest["splits"] == made["jsonl", False][0]["splits"]
    assert made["jsonl", False][0]["skipped"] == {"empty": 0, "null": 0}


def test_every_complete_zstd_file_passes_and_every_cut_one_is_refused(tmp_path):
    """The frame walk that finds a truncated .zst (zstandard's reader ends quietly at one):
    cut anywhere inside a frame, refused; cut between frames, a complete file. Raw, RLE and
    compressed blocks, with and without checksums and content sizes."""
    rng = np.random.default_rng(1)
    raw = rng.integers(97, 123, 200_000, dtype=np.uint8).tobytes()  # 2 blocks of raw data
    data = b"x" * 300_000 + raw + jsonl_bytes(corpus(200))  # RLE, raw and compressed blocks
    frames = zstd_frame_list(data)
    blob = b"".join(frames)
    path = tmp_path / "a.txt.zst"
    path.write_bytes(blob)
    assert check_file(path) and [*file_documents(path)] == [data.decode()]
    frame_ends = set(np.cumsum([0, *map(len, frames)]).tolist())
    cuts = sorted(set(range(0, len(blob), 997)) | {e - 1 for e in frame_ends if e} | frame_ends)
    for cut in cuts:
        path.write_bytes(blob[:cut])
        if cut in frame_ends:
            check_file(path)
        else:
            with pytest.raises(ValueError, match=rf"a.txt.zst: the Zstandard frame at byte \d+ "
                               rf"is cut short \(the file ends at byte {cut}\)"):  # fmt: skip
                check_file(path)


def test_a_zst_file_cut_short_after_its_check_is_refused_once_read(tmp_path):
    """zstandard's reader ends quietly at a cut frame; a file replaced by a cut one after
    check_file passed (or cut while read) must not lose its tail without a word."""
    data = jsonl_bytes(corpus(300))
    blob = zstd_frames(data)
    path = tmp_path / "a.txt.zst"
    path.write_bytes(blob[: len(blob) - 30])  # inside the last frame
    read = []
    with pytest.raises(ValueError, match=r"a.txt.zst: the Zstandard frame at byte \d+ is cut"):
        read.extend(file_documents(path))
    assert len(read) == 1 and data.decode().startswith(read[0]) and len(read[0]) < len(data)
    path.write_bytes(blob)
    assert [*file_documents(path)] == [data.decode()]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.parquet"])
def test_a_file_that_changes_while_read_is_refused(tmp_path, name):
    """A file still being written (a download) read at one size and left at another."""
    path = tmp_path / name
    docs = corpus(300)
    if name.endswith(".parquet"):
        write_parquet(path, docs, field="text")
    else:
        raw = jsonl_bytes(docs)
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    documents = file_documents(path)
    assert next(documents) == docs[0]
    late = jsonl_bytes(["a line written after prepare began"])  # valid where it lands
    with open(path, "ab") as f:
        f.write(gzip.compress(late) if name.endswith(".gz") else late)
    with pytest.raises(ValueError, match=rf"{name} changed while it was read \(\d[\d,]* bytes "
                       r"then, [\d,]+ now\): wait until"):  # fmt: skip
        list(documents)


def test_symlinks_that_loop_or_dangle_are_named(tmp_path, capsys):
    """A link in a folder that points at itself is named by the file check (it crashed the
    folder walk with an OSError, status 1); a SOURCE that is such a link says so."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("some text")
    (folder / "loop.txt").symlink_to("loop.txt")
    (tmp_path / "gone.txt").symlink_to("nowhere.txt")
    for source, said in [
        (folder, rf"{folder / 'loop.txt'} cannot be read: Too many levels of symbolic links"),
        (tmp_path / "gone.txt", r"gone.txt' is a symbolic link to 'nowhere.txt', which does "
         r"not exist or loops back"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main([str(source), "--out", str(tmp_path / "out"), "--encoding", "bytes"])
        assert info.value.code == 2
        assert re.search(said, capsys.readouterr().err.splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_parquet_is_read_in_batches_not_a_row_group_at_once(tmp_path):
    """Arrow pre-buffers a row group's whole column chunk by default (a 1 GB row group: 1 GB);
    prepare reads page by page: the peak allocation stays far below the chunk."""
    rng = np.random.default_rng(2)
    letters = rng.integers(97, 123, 16_000_000, dtype=np.uint8).tobytes().decode()
    texts = [letters[i : i + 100] for i in range(0, len(letters), 100)]
    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=len(texts), compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0).total_compressed_size
    assert chunk > 16_000_000
    peak = 0
    read = []
    for i, text in enumerate(file_documents(path)):
        if i % 512 == 0:
            peak = max(peak, pa.total_allocated_bytes())
        read.append(text)
    assert read == texts
    assert peak < chunk / 2, (peak, chunk)


def test_file_format_by_name():
    assert file_format(Path("a.jsonl.zst")) == ("jsonl", ".zst")
    assert file_format(Path("a.parquet")) == ("parquet", "")
    assert file_format(Path("a.txt.gz")) == ("text", ".gz")
    assert file_format(Path("notes")) == ("text", "")
    assert file_format(Path("a.parquet.gz")) == ("text", ".gz")  # read as text: refused as binary
    assert is_corpus_file(Path("x.md.zst")) and is_corpus_file(Path("x.jsonl.gz"))
    assert not is_corpus_file(Path("x.parquet.zst")) and not is_corpus_file(Path("x.gz"))


def damaged_inputs(tmp_path: Path) -> list[tuple[str, str]]:
    """(file name, the error it must give) for every kind of damage; files in tmp_path."""
    docs = corpus(1600)
    raw = jsonl_bytes(docs)
    cases = []

    def case(name: str, data: bytes, error: str) -> None:
        (tmp_path / name).write_bytes(data)
        cases.append((name, error))

    case("garbage.parquet", b"PAR1 not really", r"garbage.parquet is not a readable Parquet file")
    write_parquet(tmp_path / "good.parquet", docs, field="text")
    whole = (tmp_path / "good.parquet").read_bytes()
    case("footer.parquet", whole[:-9] + b"\0" * 5 + whole[-4:], r"footer.parquet is not a readable")
    case("cut.parquet", whole[: len(whole) // 2], r"cut.parquet is not a readable Parquet file")
    # A damaged page behind an intact footer: found while reading (Arrow raises a bare OSError,
    # which was reported without the file's name, as a failing environment, status 1).
    pages = bytearray(whole)
    pages[len(whole) // 3 : len(whole) // 3 + 2000] = bytes(b ^ 0x5A for b in pages[
        len(whole) // 3 : len(whole) // 3 + 2000])  # fmt: skip
    case("pages.parquet", bytes(pages), r"pages.parquet: unreadable Parquet data after row \d+ \(")
    # One flipped bit in an uncompressed page, caught by the page's CRC (read as text before).
    pq.write_table(pa.table({"text": docs}), tmp_path / "crc.parquet", compression="none",
                   write_page_checksum=True)  # fmt: skip
    flipped = bytearray((tmp_path / "crc.parquet").read_bytes())
    flipped[len(flipped) // 3] ^= 1
    case("crc.parquet", bytes(flipped), r"crc.parquet: unreadable Parquet data after row 0 \(could "
         r"not verify page integrity, CRC checksum verification failed")  # fmt: skip
    write_parquet(tmp_path / "column.parquet", docs, field="body")
    cases.append(("column.parquet", r"column.parquet: no column 'text'; its columns: id, body"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    cases.append(("ints.parquet", r"ints.parquet: column 'text' holds int64, not strings"))
    # A writer that did not check its UTF-8 (Arrow does not on reading Parquet).
    bad = pa.Array.from_buffers(
        pa.string(), 3, [None, pa.array([0, 2, 6, 9], pa.int32()).buffers()[1],
                         pa.py_buffer(b"okbad\xffyes")]
    )  # fmt: skip
    pq.write_table(pa.table({"text": pa.concat_arrays([pa.array(["x"] * 1500), bad])}),
                   tmp_path / "utf8.parquet")  # fmt: skip
    cases.append(("utf8.parquet", r"utf8.parquet: row 1501 \(from 0\) is not UTF-8 text"))
    zst = zstd_frames(raw)
    case("cut.jsonl.zst", zst[: len(zst) - 40], r"cut.jsonl.zst: the Zstandard frame at byte \d+ "
         r"is cut short .*: the file is truncated")  # fmt: skip
    case("plain.jsonl.zst", raw, r"plain.jsonl.zst: not Zstandard data \(no frame magic at byte 0")
    gz = gzip.compress(raw)
    assert len(raw) > 2 * 65536  # cut past the first 64 KiB: found while reading, not checking
    cut = gz[: len(gz) * 3 // 4]
    complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")  # lines it holds
    case("cut.jsonl.gz", cut, r"cut.jsonl.gz: gzip data is truncated or corrupt after line "
         rf"{complete} \(Compressed file ended")  # fmt: skip
    case("head.jsonl.gz", gz[:100], r"head.jsonl.gz: gzip data is truncated or corrupt in its "
         r"first 64 KiB")  # fmt: skip
    case("plain.txt.gz", b"hello", r"plain.txt.gz: gzip data is truncated or corrupt in its first")
    number = raw + b'{"text": 5}\n'
    case("number.jsonl.zst", zstandard.ZstdCompressor().compress(number), r"number.jsonl.zst:"
         rf"{len(docs) + 1}: no string field 'text' \(it holds int 5\)")  # fmt: skip
    case("missing.jsonl.gz", gzip.compress(raw + b'{"body": "x"}\n'), r"missing.jsonl.gz:"
         rf"{len(docs) + 1}: no string field 'text' \(its keys: body\)")  # fmt: skip
    case("latin1.jsonl", raw + b'{"text": "caf\xe9"}\n', rf"latin1.jsonl:{len(docs) + 1} is not "
         r"UTF-8 text")  # fmt: skip
    return cases


def test_every_damaged_input_is_one_line_status_2_naming_it_and_dir_is_untouched(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cases = damaged_inputs(src)
    out = tmp_path / "data"
    prepare([str(src / "good.parquet")], out, **{**OPTIONS, "shard_tokens": 10_000})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for name, error in cases:
        with pytest.raises(SystemExit) as info:
            main([str(src / name), "--out", str(out), "--encoding", "bytes"])
        message = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
        assert info.value.code == 2, (name, message)
        assert message.startswith("python -m gpt.data.prepare: error: "), message
        assert re.search(error, message), (name, error, message)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"], name
