"""Medians over repeated bench-mode runs, as a Markdown table.

    python bench/bench_summary.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a ``bench.json`` written by ``python train.py CONFIG --bench.steps=N``;
runs of the same configuration (repeated on a loaded machine) are grouped by loop,
attention backend and compile setting, and each row shows the median step time over the
runs, the median of the engine's ``vs_bare`` ratio, and every run's value.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for run_dir in sys.argv[1:]:
        report = json.loads((Path(run_dir) / "bench.json").read_text())
        for r in report["results"]:
            if r["status"] == "ok":
                rows[r["loop"], r["attention"], r["compile"]].append(r)
    print("| loop | attention | compile | step ms (median) | tokens/s | vs bare | runs (ms) |")
    print("|---|---|---|---|---|---|---|")
    for (loop, attention, compiled), runs in rows.items():
        ms = statistics.median(r["step_ms"] for r in runs)
        tokens = statistics.median(r["tokens_per_s"] for r in runs)
        ratios = [r["vs_bare"] for r in runs if "vs_bare" in r]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else ""
        each = ", ".join(f"{r['step_ms']:.0f}" for r in runs)
        cells = [loop, attention, compiled, f"{ms:.1f}", f"{tokens:,.0f}", ratio, each]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
