"""Medians over repeated runs of bench/trainer.py, as a Markdown table.

    python bench/trainer_summary.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a ``bench.json`` written by ``python bench/trainer.py CONFIG`` (or, in
results from before it was a script, by ``python train.py CONFIG --bench.steps=N``);
runs of the same configuration (repeated on a loaded machine) are grouped by loop,
attention backend and compile setting, and each row shows the median step time (wall and CPU) over
the runs, the medians of the engine's ``vs_bare`` ratios, and every run's wall time.
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
    print(
        "| loop | attention | compile | step ms (median) | tokens/s | vs bare "
        "| CPU ms (median) | vs bare (CPU) | runs (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (loop, attention, compiled), runs in rows.items():
        ms = statistics.median(r["step_ms"] for r in runs)
        tokens = statistics.median(r["tokens_per_s"] for r in runs)
        cpu = statistics.median(r["step_cpu_ms"] for r in runs)
        ratio, cpu_ratio = (
            f"{statistics.median(r[key] for r in runs):.2f}x" if key in runs[0] else ""
            for key in ("vs_bare", "vs_bare_cpu")
        )
        each = ", ".join(f"{r['step_ms']:.0f}" for r in runs)
        cells = [loop, attention, compiled, f"{ms:.1f}", f"{tokens:,.0f}", ratio, f"{cpu:.1f}"]
        cells += [cpu_ratio, each]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
