"""Training metrics: FLOPs and MFU, the metrics.jsonl log, wandb, and the loss-curve plot.

MFU (model FLOPs utilisation, Chowdhery et al. 2022) = achieved model FLOP/s / device peak.
Model FLOPs per token = 6·N (forward + backward through N non-embedding parameters, the
tied LM head included) + 6·L·T·C for attention (QKᵀ and AV: 4·T·C per layer forward, times
3 with backward, halved because causal attention only needs the lower triangle).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from pathlib import Path

import torch

from gpt.fileio import write_atomic

# Dense peak TFLOP/s by device-name fragment: bf16/fp16 tensor cores, TF32 tensor cores for
# "fp32" (what training with TF32 matmuls can reach), and the CUDA cores' IEEE fp32 for
# "fp32_ieee" (kernels that keep exact fp32 products, such as the attention benchmark's).
# Datasheet figures; "H100 PCIe" must be matched before the SXM "H100".
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0, "fp32_ieee": 51.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "fp32_ieee": 67.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "fp32_ieee": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "fp32_ieee": 19.5}),
]


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of ``device`` for ``dtype`` (fp32 | fp32_ieee | bf16 | fp16), or None when
    unknown (any CPU, any GPU not in the table): then no MFU is reported rather than a guess."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[dtype] * 1e12
    return None


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.cfg
    return 6.0 * model.num_params(non_embedding=True) + 6.0 * cfg.n_layer * seq_len * cfg.n_embd


class MetricsLog:
    """Appends one JSON object per record to ``out_dir/metrics.jsonl`` (rank 0 only) and
    mirrors it to wandb when enabled. On resume from step s, records after s (written by
    the interrupted run after its last checkpoint) are dropped first, so the file reads as
    one uninterrupted run; a damaged line (a kill's partial last line) is dropped too.

    A failed append (a full disk) never leaves a partial line and never raises: ``error``
    holds the reason, nothing more is written, and the trainer stops with status 4."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int, wandb_run=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled, self.wandb_run = enabled, wandb_run
        self.error: str | None = None
        if enabled and self.path.exists():
            try:
                kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            except OSError as err:  # the trainer stops with status 4 at its next vote
                self.error = f"{self.path}: {err}"

    def write(self, record: dict) -> None:
        if not self.enabled or self.error is not None:
            return
        line = (json.dumps(record) + "\n").encode()
        fd = size = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(fd).st_size
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {self.path}")
        except OSError as err:
            self.error = f"{self.path}: {err}"
            if size is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no partial line left behind
        finally:
            if fd is not None:
                os.close(fd)
        if self.wandb_run is not None:
            import wandb

            values = {k: v for k, v in record.items() if k not in ("step", "samples")}
            if "samples" in record:
                values["samples"] = wandb.Table(
                    columns=["prompt", "continuation"], data=list(record["samples"].items())
                )
            self.wandb_run.log(values, step=record["step"])


def start_wandb(enabled: bool, out_dir: Path, project: str, config: dict):
    """A wandb run, offline unless the user configured wandb (WANDB_MODE or WANDB_API_KEY);
    the run id is kept in out_dir so that a resumed run continues the same wandb run."""
    if not enabled:
        return None
    import wandb

    id_file = Path(out_dir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
    return wandb.init(
        project=project,
        id=run_id,
        resume="allow",
        dir=str(out_dir),
        config=config,
        mode=None if configured else "offline",
    )


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not a JSON object with an integer
    ``step`` (a partial last line left by a kill or a full disk, or a damaged one) is dropped
    with a warning naming the file and line: one bad line never makes a run unreadable."""
    path = Path(path)
    records, dropped = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            records.append(record)
        else:
            dropped.append(number)
    if dropped:
        where = ", ".join(map(str, dropped[:5])) + (" ..." if len(dropped) > 5 else "")
        print(
            f"warning: {path}: dropped {len(dropped)} damaged line(s) ({where}): not a JSON "
            "record with a step (a kill or a full disk mid-write leaves such a line)",
            file=sys.stderr,
        )
    return records


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_losses(
    metrics_file: str | Path,
    png: str | Path,
    baseline: float | None = None,
    skip: set[str] = frozenset(),
) -> list[str]:
    """Training loss and every validation loss (``val_loss`` and ``val_loss/<name>``, but the
    keys in ``skip``) against tokens seen, from metrics.jsonl, with an optional horizontal
    reference line (the unigram baseline). Returns the curves' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_file) if is_number(r.get("tokens"))]
    train = [(r["tokens"], r["loss"]) for r in records if is_number(r.get("loss"))]
    keys = sorted({k for r in records for k in r if k.startswith("val_loss")} - set(skip))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    for key in keys:
        points = [(r["tokens"], r[key]) for r in records if is_number(r.get(key))]
        label = "val loss" if key == "val_loss" else key.replace("val_loss/", "val loss: ")
        ax.plot(*zip(*points, strict=True), "o-", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [line.get_label() for line in ax.get_lines()]
