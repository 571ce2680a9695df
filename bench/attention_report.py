"""The attention benchmark's output (`bench/attention.py`): the run's environment, and
results.json, results.csv, command.txt, summary.md and plots of TFLOP/s and peak memory
against sequence length."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

STATUS_WORDS = {"wrong": "WRONG", "oom": "OOM", "unsupported": "n/a", "skipped": "skip"}
PHASE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}  # plot rows


def device_slug(device: torch.device) -> str:
    """ "cpu", or the GPU's name in lower case with dashes: "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def environment(device: torch.device, peak_tflops: dict[str, float | None]) -> dict:
    """Device, software versions and the repository's commit, for results.json."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        lines = (
            Path("/proc/cpuinfo").read_text().splitlines()
            if os.path.exists("/proc/cpuinfo")
            else []
        )
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        name = models[0] if models else platform.processor() or platform.machine()
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        repo = {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except OSError:  # no git
        repo = {"commit": None, "dirty": None}
    return {
        "device": {
            "type": device.type,
            "name": name,
            "slug": device_slug(device),
            "peak_tflops": peak_tflops,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "platform": platform.platform(),
        },
        "git": repo,
        "env": {
            k: os.environ[k]
            for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        },
    }


def write_results(results: dict, out: Path) -> list[Path]:
    """Write every output file into ``out`` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "command.txt", out / "summary.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results["fields"])
        writer.writeheader()
        writer.writerows(results["results"])
    paths[2].write_text(results["command"] + "\n")
    paths[3].write_text(summary_markdown(results))
    for dtype in results["settings"]["dtypes"]:
        if results["settings"].get("shapes"):  # a list of shapes: bars per shape
            paths.append(plot_shapes(results, dtype, out / f"tflops-{dtype}.png"))
            continue
        paths.append(plot_tflops(results, dtype, out / f"tflops-{dtype}.png"))
        paths.append(plot_memory(results, dtype, out / f"memory-{dtype}.png"))
    return paths


def shape_label(record: dict) -> str:
    """ "4, 32/8, 4096, 128" (B, H/H_kv, T, D), as issue 17's table writes shapes."""
    heads = str(record["heads"])
    if record.get("kv_heads") not in (None, record["heads"]):
        heads += f"/{record['kv_heads']}"
    return f"{record['batch']}, {heads}, {record['seq_len']}, {record['head_dim']}"


def _panels(records: list[dict]) -> list[tuple[int, bool]]:
    """(head_dim, causal) of each panel: causal first, then by head dimension."""
    return sorted({(r["head_dim"], r["causal"]) for r in records}, key=lambda p: (not p[1], p[0]))


def _cell(record: dict, phase: str) -> str:
    if record["status"] != "ok":
        return STATUS_WORDS.get(record["status"], record["status"])
    pct = record[f"{phase}_pct_peak"]
    text = f"{record[f'{phase}_tflops']:.3g}"
    return f"{text} ({pct:.0f}%)" if pct is not None else text


def summary_markdown(results: dict, phase: str = "fwd_bwd") -> str:
    """One Markdown table per dtype, head dim and mask: backends × T, TFLOP/s of ``phase``;
    for a list of shapes (--shapes), one per dtype and mask: shapes × backends, forward and
    forward + backward TFLOP/s."""
    device = results["device"]
    if results["settings"].get("shapes"):
        return _summary_by_shape(results)
    lines = [
        f"# Attention benchmark: {device['name']}",
        "",
        f"`{results['command']}`, {results['date']}, {results['wall_s']:.0f} s, load average "
        f"{results['load_average']['start'][0]:.2f} at the start.",
        "",
        f"{PHASE_TITLES[phase]} TFLOP/s (% of the device's peak where known); WRONG: failed the "
        "check against float64; OOM: out of memory; n/a: the kernel refuses the shape; skip: "
        "not run here (see results.json for the reason).",
    ]
    for dtype in results["settings"]["dtypes"]:
        records = [r for r in results["results"] if r["dtype"] == dtype]
        for D, causal in _panels(records):
            panel = [r for r in records if r["head_dim"] == D and r["causal"] == causal]
            seq_lens = sorted({r["seq_len"] for r in panel})
            mask = "causal" if causal else "full"
            heads = sorted({r["heads"] for r in panel})
            lines += ["", f"**{dtype}, D = {D}, {mask}, heads {', '.join(map(str, heads))}**", ""]
            lines.append("| backend | " + " | ".join(f"T={T}" for T in seq_lens) + " |")
            lines.append("|---|" + "---|" * len(seq_lens))
            for backend in dict.fromkeys(r["backend"] for r in panel):
                by_t = {r["seq_len"]: r for r in panel if r["backend"] == backend}
                cells = [_cell(by_t[T], phase) if T in by_t else "" for T in seq_lens]
                lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(results: dict) -> list[str]:
    return [
        f"# Attention benchmark: {results['device']['name']}",
        "",
        f"`{results['command']}`, {results['date']}, {results['wall_s']:.0f} s, load average "
        f"{results['load_average']['start'][0]:.2f} at the start.",
        "",
    ]


def _summary_by_shape(results: dict) -> str:
    lines = _header(results) + [
        "TFLOP/s forward / forward + backward (4·B·H·T²·D, halved when causal; forward + "
        "backward counted as 3.5x the forward); WRONG: failed the check against float64; "
        "OOM: out of memory; n/a: the kernel refuses the shape; skip: not run here.",
    ]
    records = results["results"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    for dtype in results["settings"]["dtypes"]:
        for causal in (True, False):
            panel = [r for r in records if r["dtype"] == dtype and r["causal"] == causal]
            if not panel:
                continue
            lines += ["", f"**{dtype}, {'causal' if causal else 'full'}**", ""]
            lines.append("| shape (B, H/H_kv, T, D) | " + " | ".join(backends) + " |")
            lines.append("|---|" + "---|" * len(backends))
            by = {(shape_label(r), r["backend"]): r for r in panel}
            for label in dict.fromkeys(shape_label(r) for r in panel):
                cells = []
                for backend in backends:
                    r = by.get((label, backend))
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(STATUS_WORDS.get(r["status"], r["status"]))
                    else:
                        cells.append(f"{r['fwd_tflops']:.3g} / {r['fwd_bwd_tflops']:.3g}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_shapes(results: dict, dtype: str, png: Path) -> Path:
    """Bars of TFLOP/s per shape and backend: a row per phase, a column per mask."""
    records = [r for r in results["results"] if r["dtype"] == dtype]
    styles = _backend_styles(records)
    masks = [c for c in (True, False) if any(r["causal"] == c for r in records)]
    plt, fig, axes = _figure(len(PHASE_TITLES), max(1, len(masks)))
    fig.set_layout_engine("constrained")
    for col, causal in enumerate(masks):
        panel = [r for r in records if r["causal"] == causal]
        labels = list(dict.fromkeys(shape_label(r) for r in panel))
        width = 0.8 / max(1, len(styles))
        for row, phase in enumerate(PHASE_TITLES):
            ax = axes[row, col]
            for i, (backend, style) in enumerate(styles.items()):
                by = {shape_label(r): r for r in panel if r["backend"] == backend}
                xs = [x + i * width for x, label in enumerate(labels)
                      if label in by and by[label]["status"] == "ok"]  # fmt: skip
                ys = [by[label][f"{phase}_tflops"] for label in labels
                      if label in by and by[label]["status"] == "ok"]  # fmt: skip
                ax.bar(xs, ys, width, label=backend, color=style["color"])
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels,
                          rotation=20, fontsize=7)  # fmt: skip
            ax.set_title(f"{PHASE_TITLES[phase]}, {'causal' if causal else 'full'}")
            ax.set_ylabel("TFLOP/s")
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right center")
    fig.suptitle(f"Attention TFLOP/s by shape, {dtype}, {results['device']['name']}")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _figure(n_rows: int, n_cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.2 * n_rows), squeeze=False)
    return plt, fig, axes


def _backend_styles(records: list[dict]) -> dict[str, dict]:
    """A colour and a marker per backend, the same in every panel; markers keep backends
    that coincide (sdpa and the kernel it picks) visible."""
    import matplotlib

    names = list(dict.fromkeys(r["backend"] for r in records))
    return {
        name: dict(color=matplotlib.colormaps["tab10"](i % 10), marker="os^vDP*X"[i % 8])
        for i, name in enumerate(names)
    }


def _finish(plt, fig, axes, records: list[dict], title: str, png: Path) -> Path:
    handles = {}
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seq_len"] for r in records}))
        ax.set_xticklabels([str(T) for T in sorted({r["seq_len"] for r in records})])
        ax.set_xlabel("sequence length T")
        ax.grid(alpha=0.3)
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right center")
    fig.suptitle(title)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_tflops(results: dict, dtype: str, png: Path) -> Path:
    """TFLOP/s against T per backend: a row per phase, a column per (head dim, mask)."""
    records = [r for r in results["results"] if r["dtype"] == dtype]
    panels, styles = _panels(records), _backend_styles(records)
    peak = results["device"]["peak_tflops"].get(dtype)
    plt, fig, axes = _figure(len(PHASE_TITLES), max(1, len(panels)))
    fig.set_layout_engine("constrained")
    for row, phase in enumerate(PHASE_TITLES):
        for col, (D, causal) in enumerate(panels):
            ax = axes[row, col]
            for backend, style in styles.items():
                points = sorted(
                    (r["seq_len"], r[f"{phase}_tflops"])
                    for r in records
                    if r["backend"] == backend and r["head_dim"] == D and r["causal"] == causal
                    if r["status"] == "ok"
                )
                if points:
                    ax.plot(*zip(*points, strict=True), label=backend, ms=5, mfc="none", **style)
            ax.set_title(f"{PHASE_TITLES[phase]}, D={D}, {'causal' if causal else 'full'}")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            if peak:
                ax.secondary_yaxis(
                    "right",
                    functions=(lambda t, p=peak: 100 * t / p, lambda c, p=peak: c * p / 100),
                ).set_ylabel("% of peak")
    title = f"Attention TFLOP/s, {dtype}, {results['device']['name']}"
    return _finish(plt, fig, axes, records, title, png)


def plot_memory(results: dict, dtype: str, png: Path) -> Path:
    """Peak memory of one forward + backward against T, log scale, per (head dim, mask)."""
    records = [r for r in results["results"] if r["dtype"] == dtype]
    panels, styles = _panels(records), _backend_styles(records)
    plt, fig, axes = _figure(1, max(1, len(panels)))
    fig.set_layout_engine("constrained")
    for col, (D, causal) in enumerate(panels):
        ax = axes[0, col]
        for backend, style in styles.items():
            points = sorted(
                (r["seq_len"], r["fwd_bwd_peak_mem_bytes"] / 2**20)
                for r in records
                if r["backend"] == backend and r["head_dim"] == D and r["causal"] == causal
                if r["status"] == "ok" and r["fwd_bwd_peak_mem_bytes"]
            )
            if points:
                ax.plot(*zip(*points, strict=True), label=backend, ms=5, mfc="none", **style)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(lambda y, _: f"{y:g}")  # 20, 30, not 2×10¹
        ax.set_title(f"D={D}, {'causal' if causal else 'full'}")
        ax.set_ylabel("peak memory per call (MiB)")
    title = f"Attention forward + backward peak memory, {dtype}, {results['device']['name']}"
    return _finish(plt, fig, axes, records, title, png)
