"""The BIG-bench fetch (gpt.data.assets.extract_bigbench) on a small sdist-shaped archive made
here: only task.json files under benchmark_tasks/ are extracted, the sha256 is checked first,
a failure leaves the previous suite in place. (The real 358 MB sdist is fetched by
`make bigbench`, never by the tests.)"""

import io
import tarfile

import pytest

from gpt.data import assets
from gpt.fileio import sha256_file

PREFIX = "bigbench-1.0.0/bigbench/"


def make_sdist(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


MEMBERS = {
    PREFIX + "benchmark_tasks/a/task.json": b'{"examples": []}',
    PREFIX + "benchmark_tasks/a/README.md": b"readme",
    PREFIX + "benchmark_tasks/b/sub/task.json": b'{"examples": [1]}',
    PREFIX + "api/task.json": b"not a task",
    "bigbench-1.0.0/setup.py": b"",
}


def test_extracts_only_task_files_after_checking_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", MEMBERS)
    monkeypatch.setattr(assets, "BIGBENCH_SHA256", sha256_file(sdist))
    monkeypatch.setattr(assets, "BIGBENCH_TASKS", 2)
    out = assets.extract_bigbench(sdist)
    assert out == tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["VERIFIED", "a/task.json", "b/sub/task.json"]
    assert (out / "b" / "sub" / "task.json").read_bytes() == b'{"examples": [1]}'
    assert assets.fetch_bigbench() == out  # cached: no download


def test_wrong_hash_or_count_is_refused_and_keeps_the_old_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    old = assets.bigbench_dir() / "a" / "task.json"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", MEMBERS)
    with pytest.raises(RuntimeError, match=r"bigbench-1\.0\.0\.tar\.gz: sha256 [0-9a-f]{64}, "):
        assets.extract_bigbench(sdist)
    monkeypatch.setattr(assets, "BIGBENCH_SHA256", sha256_file(sdist))
    with pytest.raises(RuntimeError, match="found 2 task.json files, expected 1041"):
        assets.extract_bigbench(sdist)
    assert old.read_text() == "old"
    assert [p.name for p in old.parents[1].parent.iterdir()] == ["benchmark_tasks"]  # no debris


def test_a_registry_without_the_sdist_says_how_to_use_a_copy(tmp_path, monkeypatch, capsys):
    """Where PyPI offers no bigbench==1.0.0, the error carries pip's reason and the way out."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))

    def no_such_version(spec, dest, sdist=True):
        raise RuntimeError(f"could not download {spec} from PyPI: No matching distribution")

    monkeypatch.setattr(assets, "pip_download", no_such_version)
    with pytest.raises(SystemExit) as exit_:
        assets.main(["bigbench"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "could not download bigbench==1.0.0 from PyPI: No matching distribution" in err
    assert "python -m gpt.data.assets bigbench --from PATH" in err
    assert "bigbench-1.0.0.tar.gz" in err and "checkout" in err


def test_from_a_downloaded_sdist_or_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", MEMBERS)
    with pytest.raises(SystemExit):  # wrong hash: refused, exit 1
        assets.main(["bigbench", "--from", str(sdist)])
    assert not assets.bigbench_dir().exists()
    monkeypatch.setattr(assets, "BIGBENCH_SHA256", sha256_file(sdist))
    monkeypatch.setattr(assets, "BIGBENCH_TASKS", 2)
    assets.main(["bigbench", "--from", str(sdist)])
    assert (assets.bigbench_dir() / "VERIFIED").exists()

    checkout = tmp_path / "BIG-bench"
    for name, data in MEMBERS.items():
        path = checkout / name.removeprefix("bigbench-1.0.0/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = assets.fetch_bigbench(checkout)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["CHECKOUT", "a/task.json", "b/sub/task.json"]  # api/task.json left out
    assert "2 task.json files copied from" in (out / "CHECKOUT").read_text()
    assert assets.fetch_bigbench() == out  # now cached
    with pytest.raises(RuntimeError, match=r"empty: no task\.json files under it"):
        (tmp_path / "empty").mkdir()
        assets.fetch_bigbench(tmp_path / "empty")
    with pytest.raises(SystemExit):
        assets.main(["gpt2", "--from", str(checkout)])  # --from is for bigbench alone
