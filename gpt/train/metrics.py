"""Training metrics: FLOPs and MFU, the metrics.jsonl log, wandb, and the loss-curve plot.

MFU (model FLOPs utilisation, Chowdhery et al. 2022) = achieved model FLOP/s / device peak.
Model FLOPs per token = 6·N (forward + backward through N non-embedding parameters, the
tied LM head included) + 6·L·T·C for attention (QKᵀ and AV: 4·T·C per layer forward, times
3 with backward, halved because causal attention only needs the lower triangle).
"""

from __future__ import annotations

import json
import os
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
    one uninterrupted run."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int, wandb_run=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled, self.wandb_run = enabled, wandb_run
        if enabled and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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

    records = read_metrics(metrics_file)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    keys = sorted({k for r in records for k in r if k.startswith("val_loss")} - set(skip))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    for key in keys:
        points = [(r["tokens"], r[key]) for r in records if key in r]
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
