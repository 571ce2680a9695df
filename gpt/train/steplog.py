"""The training loop's log: every step's loss, learning rate, gradient norm and speed, to
the terminal, ``metrics.jsonl`` and wandb, without waiting for the device at every step.

A step's values stay on the device (``add``) until ``flush`` reads every pending step back
in one synchronisation; the loop flushes at log, evaluation and checkpoint steps only. The
log also gives the non-finite verdict: a step whose loss is not finite or whose update the
optimizer skipped is "bad", and ``max_nonfinite_steps`` bad steps in a row set
``abort_at``, the step at which the run must stop.

Records (one JSON object per line of metrics.jsonl) are written for every
``log_interval``-th step, the last step, evaluation steps (with the validation losses and
samples in the same record) and every bad step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from gpt.config import TrainConfig
from gpt.train import dist
from gpt.train.metrics import MetricsLog


class StepLog:
    def __init__(
        self,
        t: TrainConfig,
        out_dir: Path,
        step: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float | None,
        wandb_run=None,
        data_progress: Callable[[], dict] | None = None,
    ):
        """``data_progress`` gives what the data loader has read after a step (a mixture's
        tokens and epochs per source), recorded with the step."""
        self.t, self.main = t, dist.is_main()
        self.data_progress = data_progress or dict
        self.tokens_per_step, self.flops_per_token, self.peak = (
            tokens_per_step,
            flops_per_token,
            peak_flops,
        )
        # a fresh start (no checkpoint) keeps nothing of an earlier attempt's metrics
        self.metrics = MetricsLog(out_dir, self.main, step if step else -1, wandb_run)
        self.bar = tqdm(
            total=t.max_steps, initial=step, disable=not self.main, dynamic_ncols=True, leave=False
        )
        self.pending: list[dict] = []  # steps not yet read back from the device
        self.nonfinite_run = 0
        self.abort_at: int | None = None  # step at which max_nonfinite_steps was reached
        self.window_start = time.perf_counter()

    @property
    def error(self) -> str | None:
        """Why metrics.jsonl could not be written (a full disk), or None."""
        return self.metrics.error

    def due(self, step: int) -> bool:
        """Whether ``step`` is one to print and record (every log_interval-th and the last)."""
        return step % self.t.log_interval == 0 or step == self.t.max_steps

    def add(self, step: int, tokens: int, lr: float, loss_sum, skipped, grad_norm) -> None:
        """One optimizer step: ``loss_sum`` is the sum of this rank's micro-batch losses (a
        device scalar), ``skipped`` and ``grad_norm`` as ``Engine.step_health`` gives them,
        ``tokens`` those seen up to and including this step."""
        self.pending.append(
            dict(step=step, tokens=tokens, lr=lr, loss=loss_sum, skipped=skipped, norm=grad_norm)
        )
        self.pending[-1]["data"] = self.data_progress()  # host numbers, read now

    def flush(self, evaluation: dict | None = None) -> None:
        """Read the pending steps back from the device (one synchronisation), give the
        non-finite verdict, print and record them; ``evaluation`` (validation losses,
        samples) joins the last step's record."""
        if not self.pending:
            return
        t, n = self.t, len(self.pending)
        sums = torch.stack([p["loss"] for p in self.pending])
        losses = (dist.all_reduce(sums) / (t.grad_accum * dist.world_size())).tolist()
        skipped = _read([p["skipped"] for p in self.pending])
        norms = _read([p["norm"] for p in self.pending])
        now = time.perf_counter()
        step_s, self.window_start = (now - self.window_start) / n, now
        for i, p in enumerate(self.pending):
            bad = bool(skipped[i]) or not math.isfinite(losses[i])
            self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
            if self.nonfinite_run >= t.max_nonfinite_steps and self.abort_at is None:
                self.abort_at = p["step"]
            record = {
                "step": p["step"],
                "tokens": p["tokens"],
                **p["data"],
                "loss": losses[i],
                "lr": p["lr"],
                "grad_norm": norms[i],
                "tokens_per_s": self.tokens_per_step / step_s,
                "step_ms": 1000 * step_s,
            }
            if self.peak:
                record["mfu"] = self.flops_per_token * record["tokens_per_s"] / self.peak
            if bad:
                record["skipped"] = True
            last = i == n - 1
            if bad or (last and evaluation is not None) or self.due(p["step"]):
                self.print_step(record)
                if last and evaluation is not None:
                    record.update(evaluation)
                    self.print_evaluation(record)
                self.metrics.write(record)
        self.bar.update(n)
        self.pending = []

    def evaluation(self, step: int, tokens: int, evaluation: dict) -> None:
        """A record of an evaluation alone: step 0's, of the weights before any update."""
        record = {"step": step, "tokens": tokens, **evaluation}
        if self.main:
            self.bar.write(
                "  step 0: "
                + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val"))
            )
        self.metrics.write(record)

    def print_step(self, r: dict) -> None:
        if self.main:
            self.bar.write(
                f"step {r['step']:6d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"grad norm {r['grad_norm'] or float('nan'):.3f} | "
                f"{r['tokens_per_s']:,.0f} tok/s | {r['step_ms']:.0f} ms"
                + (" | SKIPPED: non-finite" if r.get("skipped") else "")
            )

    def print_evaluation(self, r: dict) -> None:
        if self.main:
            self.bar.write(
                "  " + " | ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val"))
            )
            for prompt, text in r.get("samples", {}).items():
                self.bar.write("  sample: " + (prompt + text).replace("\n", "\n    "))

    def close(self) -> None:
        self.bar.close()


def _read(values: list) -> list[float | None]:
    """Host floats of per-step values that are device scalars, floats or None (one
    synchronisation for all the device scalars)."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([v.float() for v in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else (None if v is None else float(v)) for v in values]
