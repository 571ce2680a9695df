"""Reliability of the data pipeline (issue 12 items 3 and 6, issue 16): a failed or killed
`prepare` never destroys a data set, files it did not write are refused, and every bad shard,
manifest or split is a one-line ValueError naming the file and what to do. (Staging itself,
the swap, its recovery and its lock: test_data_staging.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpt.data import prepare as prepare_module
from gpt.data import staging
from gpt.data.loader import TokenLoader
from gpt.data.prepare import is_val, prepare
from gpt.data.shards import open_split, read_manifest

PREPARE = [sys.executable, "-m", "gpt.data.prepare"]


def run_prepare(src, out, *more, **kwargs):
    opts = dict(encoding="bytes", val_fraction=0.25, shard_tokens=128, workers=1)
    opts.update(kwargs)
    return prepare([str(s) for s in [src, *more]], out, progress=False, fetch=False, **opts)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def dataset(tmp_path):
    """A working data set in tmp_path/ds (several shards per split) and its source folder."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i:02d}.txt").write_text(f"document {i} " * (i + 1))
    out = tmp_path / "ds"
    run_prepare(src, out)
    return src, out


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --- item 3: a failed prepare must never destroy the existing data set -----------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda d: d.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(200)), id="nul"),
        pytest.param(lambda d: d.write_bytes(b"text then \xff\xfe garbage"), id="not-utf8"),
        pytest.param(lambda d: d.write_text(""), id="empty-corpus"),
        pytest.param(lambda d: None, id="missing-path"),
    ],
)
def test_bad_input_leaves_old_dataset_intact(dataset, tmp_path, bad):
    _, out = dataset
    before = snapshot(out)
    path = tmp_path / "bad.txt"
    bad(path)
    with pytest.raises(ValueError, match="bad.txt") as info:
        run_prepare(path, out)
    assert "\n" not in str(info.value)
    assert snapshot(out) == before
    assert [len(a) for a in open_split(out, "train")]  # still loads
    assert siblings(out) == []  # nothing left beside it


def test_binary_file_is_refused_before_any_document_is_read(tmp_path, monkeypatch):
    # The check reads only the head of each file, before tokenizing starts: a binary file
    # last in the list must not cost a pass over the others first.
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "z.bin").write_bytes(bytes(100))
    monkeypatch.setattr(prepare_module, "iter_documents", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(ValueError, match=r"z.bin looks binary \(a NUL byte at offset 0\)"):
        run_prepare(tmp_path / "a.txt", tmp_path / "out", tmp_path / "z.bin")
    assert not (tmp_path / "out").exists()


def test_error_found_mid_run_leaves_old_dataset_intact(dataset, tmp_path):
    # A bad JSONL line deep in a file is found only while reading it; DIR is untouched.
    _, out = dataset
    before = snapshot(out)
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(200)] + ["{not json"]
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"late.jsonl:201: not valid JSON"):
        run_prepare(tmp_path / "late.jsonl", out)
    assert snapshot(out) == before and siblings(out) == []


def test_foreign_files_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "doc.txt").write_text("hello world")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train_000000.bin").write_bytes(b"the user's own file")
    (out / "notes.md").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files prepare did not write .*--overwrite"):
        run_prepare(tmp_path / "doc.txt", out)
    assert (out / "train_000000.bin").read_bytes() == b"the user's own file"
    assert siblings(out) == []
    run_prepare(tmp_path / "doc.txt", out, overwrite=True)
    assert sorted(snapshot(out)) == ["manifest.json", "train_000000.bin"]
    assert read_manifest(out)["splits"]["train"]["documents"] == 1


def test_a_file_next_to_a_prepared_dataset_is_foreign(dataset, tmp_path):
    src, out = dataset
    (out / "README.txt").write_text("added by hand")
    with pytest.raises(ValueError, match=r"holds files prepare did not write \(README.txt\)"):
        run_prepare(src, out)
    assert (out / "README.txt").exists()


def test_rerun_replaces_own_dataset_and_an_empty_dir(dataset, tmp_path):
    src, out = dataset
    run_prepare(src, out, shard_tokens=10_000)  # fewer, larger shards: old ones must go
    assert sorted(snapshot(out)) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run_prepare(src, empty)
    assert read_manifest(empty)["splits"]["train"]["documents"] == 9


def test_overwrite_never_deletes_a_source_or_the_working_directory(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "doc.txt").write_text("my only copy")
    with pytest.raises(ValueError, match=r"doc.txt lies inside --out .*corpus"):
        run_prepare(out / "doc.txt", out, overwrite=True)
    (tmp_path / "other.txt").write_text("x")
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match=r"contains the current directory"):
        run_prepare(tmp_path / "other.txt", out, overwrite=True)
    assert (out / "doc.txt").read_text() == "my only copy"
    ours = tmp_path / "ours"
    run_prepare(tmp_path / "other.txt", ours)
    monkeypatch.chdir(ours)  # even a data set prepare wrote: the shell would be left in a ghost
    with pytest.raises(ValueError, match=r"contains the current directory"):
        run_prepare(tmp_path / "other.txt", ours)


def test_environment_failure_exits_1_and_keeps_the_dataset(dataset, monkeypatch, capsys):
    src, out = dataset
    before = snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "_write_dataset", disk_full)
    with pytest.raises(SystemExit) as info:
        prepare_module.main([str(src), "--out", str(out), "--encoding", "bytes"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    prefix = "python -m gpt.data.prepare: error: [Errno 28] No space left on device"
    assert err == f"{prefix} ({out} is unchanged)\n"
    assert snapshot(out) == before and siblings(out) == []


def test_out_is_a_file(tmp_path):
    (tmp_path / "doc.txt").write_text("x")
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(ValueError, match=r"--out .*f is a file, not a directory"):
        run_prepare(tmp_path / "doc.txt", tmp_path / "f")


def test_second_prepare_on_the_same_out_is_refused(dataset, tmp_path):
    src, out = dataset
    with staging.Staging(out):  # holds the lock, as a running prepare does
        with pytest.raises(ValueError, match=rf"another prepare \(host .* pid {os.getpid()}\)"):
            run_prepare(src, out)
    run_prepare(src, out)  # released


KILLABLE = """
import sys, time
from gpt.data import prepare as p
real = p.iter_documents
def slow(*a, **k):
    for i, doc in enumerate(real(*a, **k)):
        if i == 5:
            open(sys.argv[3], "w").close()  # tell the test we are mid-run
            time.sleep(60)
        yield doc
p.iter_documents = slow
p.BATCH_CHARS = 10
p.main([sys.argv[1], "--out", sys.argv[2], "--encoding", "bytes", "--shard-tokens", "8"])
"""


def test_sigkill_mid_run_keeps_old_dataset_and_next_run_cleans_up(dataset, tmp_path):
    src, out = dataset
    before = snapshot(out)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(src), str(out), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child never got going"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(out) == before
    assert open_split(out, "train")
    left = siblings(out)
    assert ".ds.prepare-new" in left, left  # shards of the killed run
    run_prepare(src, out, shard_tokens=10_000)
    assert siblings(out) == []
    assert sorted(snapshot(out)) == ["manifest.json", "train_000000.bin", "val_000000.bin"]


def test_two_rename_fallback_swaps_and_restores_on_failure(dataset, monkeypatch):
    src, out = dataset
    before = snapshot(out)
    monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    real_rename = os.rename

    def second_fails(a, b):
        if Path(a).name.endswith(".prepare-new"):
            raise OSError(28, "No space left on device")  # e.g. the second rename fails
        real_rename(a, b)

    monkeypatch.setattr(staging.os, "rename", second_fails)
    with pytest.raises(OSError, match="No space left"):
        run_prepare(src, out, shard_tokens=10_000)
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.setattr(staging.os, "rename", real_rename)
    run_prepare(src, out, shard_tokens=10_000)
    assert sorted(snapshot(out)) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    assert siblings(out) == []


# --- worker processes: a killed or interrupted prepare leaves none behind, prints no traceback

# Stops after submitting four one-document batches, so the two worker processes are being
# spawned (importing, loading the tokenizer) when the test signals it.
STARTING = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
from gpt.data import prepare as p
real = p.iter_documents
def slow(*a, **k):
    for i, doc in enumerate(real(*a, **k)):
        if i == 5:
            open(sys.argv[3], "w").close()
            time.sleep(60)
        yield doc
p.iter_documents = slow
p.BATCH_CHARS = 1
p.main([sys.argv[1], "--out", sys.argv[2], "--encoding", "bytes", "--workers", "2"])
"""


def live_children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, zombies (exited, not yet reaped) left out."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_mid_spawn(dataset, tmp_path, **popen) -> tuple[subprocess.Popen, list[int]]:
    src, out = dataset
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-c", STARTING, str(src), str(out), str(ready)]
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "child never got going"
        time.sleep(0.02)
    return proc, live_children(proc.pid)


def assert_all_end(pids: list[int], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for pid in left:  # ours: do not leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived the prepare that started them"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_prepare_leaves_no_worker_processes_behind(dataset, tmp_path, sig):
    """Before: the workers waited for work from the dead process forever."""
    proc, children = start_mid_spawn(dataset, tmp_path)
    assert len(children) >= 2, children  # the workers (and multiprocessing's tracker)
    proc.send_signal(sig)
    proc.wait()
    assert_all_end(children)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_while_workers_start_exits_130_without_a_traceback(dataset, tmp_path):
    """Ctrl-C signals the whole process group: the workers ignore it, the main process
    stops them and exits 130 with one line (before: each starting worker's traceback)."""
    src, out = dataset
    before = snapshot(out)
    proc, children = start_mid_spawn(dataset, tmp_path, stderr=subprocess.PIPE, text=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().endswith(f"interrupted ({out} is unchanged)"), err
    assert snapshot(out) == before
    assert_all_end(children)


def test_ctrl_c_while_prepare_imports_is_an_exit_status_not_a_traceback():
    """As train.py's (test_reliability.py): SIGINT while numpy loads (seen in -X importtime's
    report) exits 130 without a traceback."""
    proc = subprocess.Popen([*PREPARE[:1], "-X", "importtime", *PREPARE[1:], "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = []
    for line in proc.stderr:  # one line as each module finishes importing
        seen.append(line)
        if re.search(r"\|\s+numpy\.", line):  # a first part of numpy: numpy is loading
            break
    assert proc.poll() is None, "the imports finished before numpy's: " + "".join(seen[-5:])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out[-500:], err[-2000:])
    assert "Traceback" not in err


def test_prepare_from_a_script_without_a_main_guard_is_a_clear_error(dataset, tmp_path):
    src, _ = dataset
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from gpt.data.prepare import prepare\n"
        f"prepare([{str(src)!r}], {str(tmp_path / 'new')!r}, encoding='bytes', workers=2, "
        "progress=False)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a prepare worker process died (--workers 2)"), last
    assert "without `if __name__ == '__main__':`" in last and "workers=1" in last
    assert not (tmp_path / "new").exists() and siblings(tmp_path / "new") == []


# --- issue 16: exact validation counts, empty validation split, usage -----------------------


def round_half_up(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.05, 0.3, 0.5, 0.333, 0.01, 0.9])
def test_first_n_documents_hold_exactly_round_f_n_val(fraction):
    # Reference: decimal arithmetic on the fraction as typed, rounding halves up.
    picks = np.array([is_val(i, Fraction(str(fraction)), 0) for i in range(500)])
    counts = np.cumsum(picks)
    for n in range(1, 501):
        assert counts[n - 1] == round_half_up(Decimal(str(fraction)) * n), (fraction, n)
    # Spread evenly: any window of n consecutive documents holds floor or ceil of f*n.
    for n in (7, 10, 33):
        windows = counts[n - 1 :] - np.concatenate([[0], counts[:-n]])
        assert set(windows) <= {int(fraction * n), int(fraction * n) + 1}


def test_seed_shifts_the_selection_by_documents():
    f = Fraction(1, 10)
    base = [is_val(i, f, 0) for i in range(100)]
    for seed in (1, 3, 7):
        shifted = [is_val(i, f, seed) for i in range(100)]
        assert shifted != base and shifted == [is_val(i + seed, f, 0) for i in range(100)]
        assert sum(shifted) == 10


@pytest.mark.parametrize("n, fraction, expected", [(42, 0.1, 4), (5, 0.1, 1), (3, 0.5, 2)])
def test_prepare_puts_round_f_n_documents_in_val(tmp_path, n, fraction, expected):
    # 42 documents at 0.1 is the Shakespeare recipe: it used to put 5 in val.
    for i in range(n):
        (tmp_path / f"{i:02d}.txt").write_text(f"play {i}")
    manifest = run_prepare(tmp_path, tmp_path / "out", val_fraction=fraction)
    assert manifest["splits"]["val"]["documents"] == expected
    assert manifest["splits"]["train"]["documents"] == n - expected


def test_val_fraction_zero_gives_an_empty_val_split(tmp_path):
    (tmp_path / "doc.txt").write_text("hello world")
    run_prepare(tmp_path / "doc.txt", tmp_path / "out", val_fraction=0)
    val = read_manifest(tmp_path / "out")["splits"]["val"]
    assert val == {"documents": 0, "tokens": 0, "shards": []}
    with pytest.raises(ValueError, match=r"split 'val' is empty .*--val-fraction"):
        TokenLoader(tmp_path / "out", "val", 4, 1)


def test_cli_usage_names_the_installed_module_and_runs_anywhere(dataset, tmp_path):
    _, out = dataset
    before = snapshot(out)
    help_ = subprocess.run([*PREPARE, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: python -m gpt.data.prepare")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01binary")
    bad = subprocess.run(
        [*PREPARE, "blob.txt", "--out", str(out), "--encoding", "bytes"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("python -m gpt.data.prepare: error: blob.txt")
    assert snapshot(out) == before
    assets = subprocess.run(
        [sys.executable, "-m", "gpt.data.assets", "--help"], cwd=tmp_path, capture_output=True
    )
    assert assets.stdout.decode().startswith("usage: python -m gpt.data.assets")


# --- item 6: one-line errors naming the file and what to do ---------------------------------


def corrupt(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: corrupt(p, 70, b"\xee"), r"CRC-32 [0-9a-f]{8} does not match"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), r"file is \d+ bytes, expected \d+"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "shorter than the 64-byte header"),
        (lambda p: p.unlink(), "does not exist"),
        (lambda p: corrupt(p, 0, b"NOTSHARD"), "bad magic"),
    ],
)
def test_bad_shard_message_says_what_to_do(dataset, damage, message):
    _, out = dataset
    shard = out / "train_000001.bin"
    damage(shard)
    with pytest.raises(ValueError, match=message) as info:
        TokenLoader(out, "train", 4, 1)
    text = str(info.value)
    assert str(shard) in text and "\n" not in text
    command = read_manifest(out)["command"]
    assert text.endswith(f"re-run `{command}`" if command else f"--out {out}`")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("\udcff", "not valid JSON"),
        (lambda m: {**m, "splits": {"train": m["splits"]["train"]}}, "no split 'val'"),
        (lambda m: {**m, "n_vocab": "257"}, "n_vocab must be an integer >= 1"),
        (lambda m: {**m, "eot": 999}, r"eot 999 is not below n_vocab"),
        (lambda m: m["splits"]["train"].pop("tokens") and m, "split 'train': missing 'tokens'"),
        (
            lambda m: m["splits"]["val"].update(tokens=7) or m,
            r"'val' has tokens 7, but its shards sum to",
        ),
        (
            lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin") or m,
            "not a file name",
        ),
        (lambda m: m["splits"]["train"]["shards"][0].pop("crc32") and m, "shard entry"),
    ],
)
def test_corrupt_manifest_is_a_one_line_value_error(dataset, text, message):
    _, out = dataset
    path = out / "manifest.json"
    if callable(text):
        text = json.dumps(text(json.loads(path.read_text())))
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(out)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "gpt.data.prepare" in text


def test_missing_manifest_and_dir_say_how_to_create_them(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist; create it with `python -m gpt"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"manifest.json not found: .*python -m gpt.data.prepare"):
        read_manifest(tmp_path)
    # a corpus file given where its data set belongs (data.sources.web = "web.jsonl"): not
    # "does not exist; create it with prepare ... --out web.jsonl"
    (tmp_path / "web.jsonl").write_text('{"text": "hi"}\n')
    said = r"web.jsonl is a file, not a folder written by prepare; prepare it with `python -m "
    with pytest.raises(ValueError, match=said + r"gpt.data.prepare .*web.jsonl --out DIR`"):
        read_manifest(tmp_path / "web.jsonl")


def test_block_size_larger_than_the_data(dataset):
    _, out = dataset
    n = read_manifest(out)["splits"]["val"]["tokens"]
    with pytest.raises(ValueError) as info:
        TokenLoader(out, "val", n, 1)
    text = str(info.value)
    assert f"split 'val' has {n} tokens, fewer than block_size + 1 = {n + 1}" in text
    assert "block_size larger than the data" in text and "\n" not in text
    assert f"block_size of at most {n - 1}" in text
    TokenLoader(out, "val", n - 1, 1)  # the largest that fits works
