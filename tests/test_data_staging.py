"""gpt/data/staging.py: a data set folder is replaced only by a complete one. Committed, the
new folder is in place (by an atomic exchange, or by the two-rename fallback) and nothing is
left beside it; not committed, DIR is as it was; a killed run's leftovers are repaired by
the next one; the lock refuses a second writer, naming it; what may not be replaced is
refused, naming it. (prepare's own use of it, killed mid-run and failing mid-swap, is in
test_data_reliability.py.)"""

import contextlib
import errno
import os

import pytest

from gpt.data import staging
from gpt.data.prepare import prepare
from gpt.data.staging import Staging, exchange, foreign_entries


def tree(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def siblings(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def stage_into(out, files: dict[str, str], **kw) -> None:
    with Staging(out, **kw) as stage:
        assert stage.path == out.with_name(f".{out.name}.prepare-new") and stage.path.is_dir()
        for name, text in files.items():
            (stage.path / name).write_text(text)
        stage.commit()


@pytest.fixture
def prepared(tmp_path):
    """A folder prepare wrote (a manifest listing its shards): replaceable without
    --overwrite."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"document {i} " * 20)
    out = tmp_path / "ds"
    prepare([str(docs)], out, encoding="bytes", val_fraction=0.25, progress=False)
    return out


@pytest.mark.parametrize("before", ["missing", "empty"])
def test_commit_puts_the_new_folder_in_place(tmp_path, before):
    out = tmp_path / "ds"
    if before == "empty":
        out.mkdir()
    stage_into(out, {"a": "1", "b": "2"})
    assert tree(out) == {"a": "1", "b": "2"}
    assert siblings(out) == []  # no staging folder, no old one, no lock file


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_commit_replaces_a_prepared_data_set_whole(prepared, monkeypatch, atomic):
    if not atomic:
        monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    stage_into(prepared, {"new": "data"})
    assert tree(prepared) == {"new": "data"}  # nothing of the old data set is left
    assert siblings(prepared) == []


@pytest.mark.parametrize("fail", [True, False], ids=["error", "no-commit"])
def test_without_commit_the_folder_is_left_as_it_was(prepared, fail):
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    with pytest.raises(RuntimeError, match="mid-write") if fail else contextlib.nullcontext():
        with Staging(prepared) as stage:
            (stage.path / "partial").write_text("half")
            if fail:
                raise RuntimeError("mid-write")
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert siblings(prepared) == []


def test_a_kill_between_the_two_renames_is_undone_first_thing(prepared):
    """DIR missing, the old data set at .DIR.prepare-old: the next run puts it back before
    anything else, and leaves it in place if it commits nothing."""
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    os.rename(prepared, prepared.with_name(".ds.prepare-old"))
    with Staging(prepared):
        assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert siblings(prepared) == []


def test_a_kill_after_the_swap_leaves_old_and_new_leftovers_that_are_removed(prepared):
    old, new = prepared.with_name(".ds.prepare-old"), prepared.with_name(".ds.prepare-new")
    old.mkdir()
    (old / "stale").write_text("x")
    new.mkdir()
    (new / "partial").write_text("y")
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    with Staging(prepared) as stage:
        assert not old.exists() and list(stage.path.iterdir()) == []  # a fresh staging folder
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert siblings(prepared) == []


def test_a_second_writer_is_refused_naming_the_holder(prepared):
    with Staging(prepared):
        lock = prepared.with_name(".ds.prepare.lock")
        assert lock.read_text() == f"host {os.uname().nodename} pid {os.getpid()}\n"
        with pytest.raises(ValueError) as err:
            Staging(prepared).__enter__()
        assert str(err.value) == (
            f"another prepare (host {os.uname().nodename} pid {os.getpid()}) is writing "
            f"{prepared}; wait for it to finish (a lock is never stale: it goes with its process)"
        )
        assert lock.exists()  # the refused writer did not remove the holder's lock
    assert siblings(prepared) == []
    stage_into(prepared, {"x": "1"})  # released


def test_a_lock_file_left_behind_is_not_a_lock(prepared):
    prepared.with_name(".ds.prepare.lock").write_text("host gone pid 999999\n")
    stage_into(prepared, {"x": "1"})
    assert tree(prepared) == {"x": "1"} and siblings(prepared) == []


def test_files_prepare_did_not_write_are_refused_unless_overwrite(prepared):
    names = [f"f{i}.txt" for i in range(7)]
    for name in names:
        (prepared / name).write_text("mine")
    assert foreign_entries(prepared) == names
    with pytest.raises(ValueError) as err:
        stage_into(prepared, {"x": "1"})
    assert str(err.value) == (
        f"--out {prepared} holds files prepare did not write (f0.txt, f1.txt, f2.txt, f3.txt, "
        f"f4.txt, ... (7 in all)); choose another --out, or pass --overwrite to replace "
        f"{prepared} and everything in it"
    )
    assert (prepared / "f0.txt").exists() and siblings(prepared) == []
    stage_into(prepared, {"x": "1"}, overwrite=True)
    assert tree(prepared) == {"x": "1"}


def test_without_a_valid_manifest_every_entry_is_foreign(tmp_path, prepared):
    assert foreign_entries(prepared) == []
    (prepared / "manifest.json").write_text("{damaged")
    assert foreign_entries(prepared) == sorted(p.name for p in prepared.iterdir())
    (tmp_path / "empty").mkdir()
    assert foreign_entries(tmp_path / "empty") == []


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'f'} is a file, not a directory"):
        Staging(tmp_path / "f").__enter__()


def test_what_overwrite_would_destroy_is_refused(prepared, tmp_path, monkeypatch):
    (prepared / "keep").mkdir()
    source = prepared / "keep" / "corpus.txt"
    source.write_text("text")
    with pytest.raises(ValueError, match=rf"^source {source} lies inside --out {prepared}"):
        Staging(prepared, overwrite=True, inputs=(source,)).__enter__()
    monkeypatch.chdir(prepared / "keep")
    with pytest.raises(ValueError, match=rf"^--out {prepared} contains the current directory"):
        Staging(prepared, overwrite=True).__enter__()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(prepared / "keep"))
    with pytest.raises(ValueError, match=rf"^--out {prepared} contains your home"):
        Staging(prepared, overwrite=True).__enter__()
    assert source.read_text() == "text" and siblings(prepared) == []  # each refusal unlocked


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "y").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here; the fallback is tested above")
    assert tree(a) == {"y": "b"} and tree(b) == {"x": "a"}
    with pytest.raises(OSError) as err:
        exchange(a, tmp_path / "missing")
    assert err.value.errno == errno.ENOENT
    assert err.value.filename == str(a) and err.value.filename2 == str(tmp_path / "missing")


def test_exchange_declines_off_linux(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.sys, "platform", "darwin")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert exchange(tmp_path / "a", tmp_path / "b") is False
