"""Write requirements/lock.txt from a pip installation report (`pip install --report`).

`make lock` resolves every runtime and test dependency to its newest release (torch held at
the CPU build this machine installs), and this script turns pip's report of that resolution
into a lock: one `name==version` per distribution with the sha256 of the very file pip chose,
so `pip install --require-hashes -r requirements/lock.txt` installs exactly what was tested.
It prints what changed against the lock it replaces.

    python scripts/lock.py REPORT.json requirements/lock.txt
"""

from __future__ import annotations

import json
import platform
import re
import sys
from datetime import date
from pathlib import Path

OWN = "gpt-pretrain"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_report(path: Path) -> dict[str, tuple[str, str]]:
    """{canonical name: (version, sha256)} of every distribution the report installs."""
    try:
        report = json.loads(path.read_text())
        items = report["install"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a pip installation report ({e})") from None
    pins = {}
    for item in items:
        name = canonical(item["metadata"]["name"])
        if name == OWN:
            continue
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"{path}: no sha256 for {name} ({item['download_info']['url']})")
        pins[name] = (item["metadata"]["version"], hashes["sha256"])
    return pins


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of an existing lock ({} when there is none)."""
    if not path.exists():
        return {}
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), flags=re.M)
    return {canonical(name): version for name, version in found}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, lock = Path(argv[0]), Path(argv[1])
    pins = read_report(report)
    old = read_lock(lock)
    lines = [
        "# The exact set `make install` installs on the CPU machine and in CI: written by",
        "# `make lock` (scripts/lock.py), which resolves pyproject.toml's ranges to the newest",
        "# releases and then runs the test suite on them. Do not edit by hand.",
        f"# Resolved {date.today()} for Python {platform.python_version()} on "
        f"{platform.system()} {platform.machine()}.",
        "",
    ]
    for name in sorted(pins):
        version, sha = pins[name]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    lock.write_text("\n".join(lines) + "\n")
    for name in sorted(set(pins) | set(old)):
        before, after = old.get(name), pins.get(name, (None,))[0]
        if before != after:
            print(f"{name}: {before or '(new)'} -> {after or '(removed)'}")
    print(f"{lock}: {len(pins)} distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
