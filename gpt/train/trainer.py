"""The training loop: ``Trainer`` builds a run, resumes it, and steps it to ``max_steps``.

    trainer = Trainer(cfg, manifests, device)   # model, DeepSpeed engine, loaders
    trainer.resume()                            # from the latest complete checkpoint, if any
    status = trainer.fit()                      # the loop below; an exit status

The loop reads like nanoGPT's: set the learning rate, one optimizer step, log, evaluate,
checkpoint. It never waits for the device during an ordinary step: losses, the non-finite
flag and the gradient norm stay on the device and are read together at log, evaluation and
checkpoint steps; stopping (signals, time limit) is voted on over the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gpt import __version__
from gpt.config import Config, ConfigError
from gpt.data.loader import TokenLoader
from gpt.data.replay import ReplayLoader
from gpt.data.tokenizer import get_tokenizer
from gpt.eval.validation import eager, eval_samples, validation_loss
from gpt.fileio import write_atomic
from gpt.store import LATEST, keep_for, latest_checkpoint, read_adapter_info
from gpt.train import checkpoint as ckpt
from gpt.train import dist
from gpt.train.engine import build_engine
from gpt.train.finetune import build_model, init_pin
from gpt.train.metrics import MetricsLog, flops_per_token, peak_flops, start_wandb
from gpt.train.optim import lr_at

# Exit statuses (documented in train.py): 0 finished, 2 bad configuration or run directory in
# use, 3 aborted after too many consecutive non-finite steps, 4 a checkpoint or metrics.jsonl
# could not be written (disk full), 5 stopped at train.time_limit, 128 + N stopped by signal
# N (the last two after saving a checkpoint).
NONFINITE_EXIT = 3
CHECKPOINT_WRITE_EXIT = 4
TIME_LIMIT_EXIT = 5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM / SIGINT / SIGUSR1; the loop stops after the step it is in."""

    def __init__(self):
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.signum:  # said once: launchers often deliver a signal twice
            name = signal.Signals(signum).name
            # os.write, not print: the handler may interrupt a write to stderr (tqdm's)
            os.write(2, f"\ntrain.py: {name} received: stopping after this step\n".encode())
        self.signum = signum


def process_start_time() -> float:
    """When this process started (seconds since the epoch): train.time_limit counts from
    here, so start-up (imports, process group, resume) is inside the budget."""
    import psutil  # a DeepSpeed dependency

    return psutil.Process().create_time()


class Trainer:
    """One training run: the model, its engine and loaders, the step counter, and the loop."""

    def __init__(self, cfg: Config, manifests: dict[str, dict], device: torch.device):
        t, m = cfg.train, cfg.model
        self.cfg, self.manifests, self.device = cfg, manifests, device
        self.manifest = manifests["train"]
        self.rank, self.world = dist.rank(), dist.world_size()
        self.out_dir = Path(t.out_dir)
        # the exact weights train.init_from names now: rank 0's, should a base run save a new
        # checkpoint while the ranks start (each resolves it too, so a refusal is everyone's)
        self.base_pin = dist.broadcast_object(init_pin(cfg))
        self.model = build_model(cfg, self.base_pin).to(device)
        self.engine, self.optimizer = build_engine(self.model, cfg, self.world)
        self.loader = self._loader(cfg.data.dir, "train", t.grad_accum, cfg.data.mode)
        f = cfg.finetune
        if f.replay_fraction:
            replay = self._loader(f.replay_dir, "train", t.grad_accum, cfg.data.mode)
            self.loader = ReplayLoader(self.loader, replay, f.replay_fraction)
        val_dirs = {"val": cfg.data.dir, **cfg.data.extra_val} if t.eval_interval else {}
        self.val_loaders = {
            name: self._loader(d, "val", 1, "sequential") for name, d in val_dirs.items()
        }
        self.step = self.tokens = 0
        self.tokens_per_step = cfg.global_batch(self.world) * m.block_size
        self.flops_per_token = flops_per_token(self.model, m.block_size)
        self.peak = peak_flops(device, t.dtype)
        self.tokenizer = get_tokenizer(self.manifest["encoding"]) if t.sample_tokens else None
        self.stop = StopFlag()
        self.started = process_start_time()
        self.pending: list[dict] = []  # steps not yet read back from the device
        self.nonfinite_run = 0
        self.abort_at: int | None = None  # step at which max_nonfinite_steps was reached
        self.good: list[Path] = []  # checkpoints this process wrote or resumed from: prunable
        if self.base_pin is not None and cfg.finetune.lora_rank and dist.is_main():
            try:  # the base run's pruning keeps the checkpoint these adapters train on
                keep_for(Path(self.base_pin["path"]), self.out_dir)
            except OSError as err:
                print(
                    f"train.py: warning: cannot mark the base {self.base_pin['path']} as kept "
                    f"({err}); if its run prunes it, these adapters lose their base",
                    file=sys.stderr,
                )

    def _loader(self, data_dir: str, split: str, grad_accum: int, mode: str) -> TokenLoader:
        t = self.cfg.train
        return TokenLoader(
            data_dir,
            split,
            block_size=self.cfg.model.block_size,
            micro_batch_size=t.micro_batch_size,
            grad_accum=grad_accum,
            rank=self.rank,
            world_size=self.world,
            seed=t.seed,
            mode=mode,
        )

    # -- resume and save ----------------------------------------------------------------

    def resume(self) -> Path | None:
        """Continue from the latest usable checkpoint of ``out_dir``; None when starting
        afresh. A damaged newer one is skipped with a warning naming the file, and set aside
        (renamed, never deleted) once an older one loaded. A checkpoint of another number of
        processes or ZeRO stage loads through its universal state. ConfigError if it belongs
        to another model, data set or LoRA base, or cannot be loaded here."""
        damaged = []
        for path in reversed(ckpt.complete_checkpoints(self.out_dir)):
            try:
                saved = ckpt.read_trainer_state(path)
                universal = ckpt.check_resume(self.cfg, saved, self.manifests, self.world, path)
                self.check_base(path)
                saved = ckpt.load_checkpoint(
                    self.engine, path, universal_into=self.optimizer if universal else None
                )
            except ckpt.CheckpointError as err:
                damaged.append((path, str(err)))
                if dist.is_main():
                    print(f"train.py: warning: skipping checkpoint {path}: {err}", file=sys.stderr)
                continue
            if universal and dist.is_main():
                print(
                    f"train.py: {path.name} was saved by {saved['world_size']} process(es) "
                    f"with ZeRO stage {ckpt.zero_stage_of(saved)}: loaded from its universal/ "
                    "state",
                    file=sys.stderr,
                )
            self.load_state_dict(saved)
            self.good = [path]
            if damaged:
                dist.barrier()  # every rank is done reading them
            if dist.is_main() and damaged:  # out of the way, kept for a look
                for bad, why in damaged:
                    ckpt.set_aside(bad, f"skipped as damaged: {why}")
                write_atomic(path.parent / LATEST, path.name)
            return path
        if damaged:  # never start afresh over a run whose every checkpoint is unusable
            raise ConfigError(
                f"{self.out_dir}: no usable checkpoint ({'; '.join(w for _, w in damaged)}); "
                "restore one, or move the checkpoints directory away to start afresh"
            )
        return None

    def check_base(self, path: Path) -> None:
        """A LoRA checkpoint resumes only on the base its adapters were trained on: ConfigError
        naming it when train.init_from now holds other weights."""
        adapters = path / ckpt.ADAPTERS
        if not adapters.is_dir() or self.base_pin is None:
            return
        base = read_adapter_info(adapters)["base"]
        init_from = Path(self.cfg.train.init_from).resolve()
        if base["sha256"] is None and Path(base["path"]).resolve() == init_from:
            if dist.is_main():  # written before pins: trust init_from once; saves pin it
                print(
                    f"train.py: warning: {adapters / 'adapter.json'} names its base by path "
                    f"only; resuming on what {init_from} holds now, pinned from the next "
                    "checkpoint on",
                    file=sys.stderr,
                )
            return
        if base["sha256"] != self.base_pin["sha256"]:
            raise ConfigError(
                f"{path}: its adapters were trained on the base {base['path']}, but "
                f"train.init_from = {self.cfg.train.init_from!r} now holds other weights "
                f"({self.base_pin['path']}); resume with --train.init_from={base['path']} "
                "(if it still exists)"
            )

    def state_dict(self) -> dict:
        """``trainer.json``: everything besides DeepSpeed's state needed to continue exactly."""
        import deepspeed

        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "world_size": self.world,
            "config": dataclasses.asdict(self.cfg),
            "data_fingerprint": ckpt.data_fingerprint(self.manifests),
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "gpt": __version__,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])

    def save(self) -> Path:
        """Collective: a complete checkpoint of the current step (metrics flushed first, so
        metrics.jsonl and the checkpoint agree). A LoRA run saves its adapters only."""
        self.flush()
        f = self.cfg.finetune
        adapters = None
        if f.lora_rank:
            adapters = dict(
                rank=f.lora_rank,
                alpha=f.lora_alpha,
                targets=f.lora_targets,
                base=self.base_pin,
                tokenizer=self.manifest["encoding"],
            )
        final = ckpt.save_checkpoint(
            self.engine,
            self.out_dir,
            self.step,
            self.state_dict(),
            tokenizer=self.manifest["encoding"],
            adapters=adapters,
            universal_from=self.optimizer if self.cfg.train.universal_checkpoint else None,
        )
        keep = self.cfg.train.keep_checkpoints
        self.good = [*self.good, final][-keep:] if keep else [*self.good, final]
        if dist.is_main():
            ckpt.prune_checkpoints(self.out_dir, keep, self.good)
        return final

    # -- one step, validation ---------------------------------------------------------

    def set_lr(self) -> float:
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches (the engine steps the optimizer
        on the last); the sum of their losses on this rank, a float64 device scalar (summed
        as Python floats would be; not read here)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.train.grad_accum):
            x, y = (self._to_device(b) for b in self.loader.next_batch())
            _, loss = self.engine(x, y)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().double()
        return loss_sum

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy overlaps compute, no stream sync
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def validate(self) -> dict[str, float]:
        """Validation loss of every validation set, averaged over ranks (uncompiled)."""
        t = self.cfg.train
        self.engine.eval()
        with eager(self.engine.module):
            means = torch.stack(
                [
                    validation_loss(self.engine, v, t.eval_steps, self.device)
                    for v in self.val_loaders.values()
                ]
            )
        self.engine.train()
        means = (dist.all_reduce(means / self.world)).tolist()
        losses = {
            ("val_loss" if name == "val" else f"val_loss/{name}"): mean
            for name, mean in zip(self.val_loaders, means, strict=True)
        }
        if self.cfg.data.name and "val_loss" in losses:
            losses[f"val_loss/{self.cfg.data.name}"] = losses["val_loss"]
        return losses

    def samples(self) -> dict[str, str]:
        """Collective (ZeRO-3 gathers the parameters): a sample of every sample prompt."""
        t = self.cfg.train
        with ckpt.full_parameters(self.engine), eager(self.engine.module) as model:
            return eval_samples(model, self.tokenizer, t.sample_prompts, t.sample_tokens, t.seed)

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``max_steps``; returns the exit status (0, NONFINITE_EXIT,
        TIME_LIMIT_EXIT, 128 + signal)."""
        t = self.cfg.train
        if self.step >= t.max_steps and self.step > 0:
            return self.nothing_to_do()
        self.start_logging()
        if self.step == 0 and t.init_from != "scratch" and t.eval_interval:
            self.log_start()  # where fine-tuning starts from: the base model's losses
        last_saved = self.step
        while self.step < t.max_steps:
            lr = self.set_lr()
            loss_sum = self.train_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            self.pending.append(
                {"step": self.step, "lr": lr, "loss_sum": loss_sum, **self._flags()}
            )
            done = self.step == t.max_steps
            evaluate = bool(t.eval_interval) and (self.step % t.eval_interval == 0 or done)
            stop = self.stop_requested()
            save = bool(stop) or self.step % t.ckpt_interval == 0 or done
            if save or evaluate or self.step % t.log_interval == 0:
                self.flush(evaluate)  # the only place that waits for the device
            if self.abort_at is not None:
                return self.abort_nonfinite()
            if save:  # skipped steps left the parameters as they were: safe to save
                self.save()
                last_saved = self.step
            if stop:
                return self.stopped(stop)
        self.bar.close()
        if last_saved != self.step:  # resumed at max_steps from an earlier checkpoint
            self.save()
        if dist.is_main():
            where = self.out_dir / ckpt.CHECKPOINTS
            print(f"done: {self.step} steps, {self.tokens:,} tokens; checkpoints in {where}")
        return 0

    def start_logging(self) -> None:
        t, main = self.cfg.train, dist.is_main()
        config = dataclasses.asdict(self.cfg)
        wandb_run = start_wandb(main and t.wandb, self.out_dir, t.wandb_project, config)
        # a fresh start (no checkpoint) keeps nothing of an earlier attempt's metrics
        self.log = MetricsLog(self.out_dir, main, self.step if self.step else -1, wandb_run)
        self.bar = tqdm(
            total=t.max_steps, initial=self.step, disable=not main, dynamic_ncols=True, leave=False
        )
        self.window_start = time.perf_counter()

    def log_start(self) -> None:
        """Step 0: validation losses of the loaded weights, before any update."""
        record = {"step": 0, "tokens": 0, **self.validate()}
        if dist.is_main():
            self.bar.write(
                "  step 0: "
                + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val"))
            )
        self.log.write(record)

    def _flags(self) -> dict:
        """The step's non-finite flag and gradient norm as the optimizer left them: device
        scalars from GuardedAdamW; a DeepSpeed wrapper (fp16) that skipped before calling it
        reports its own host flag."""
        skipped = self.optimizer.skipped
        if skipped is None:
            skipped = float(bool(getattr(self.engine.optimizer, "overflow", False)))
        self.optimizer.skipped = None
        return {"skipped": skipped, "grad_norm": self.engine.get_global_grad_norm()}

    def flush(self, evaluate: bool = False) -> None:
        """Read the pending steps back from the device (one synchronisation) and log them;
        evaluate after the last if asked. Records are written for every log_interval-th
        step, the last step, evaluations and every skipped (non-finite) step."""
        if not self.pending:
            return
        t, n = self.cfg.train, len(self.pending)
        sums = torch.stack([p["loss_sum"] for p in self.pending])
        losses = (dist.all_reduce(sums) / (t.grad_accum * self.world)).tolist()
        skipped = _read([p["skipped"] for p in self.pending])
        norms = _read([p["grad_norm"] for p in self.pending])
        now = time.perf_counter()
        step_s, self.window_start = (now - self.window_start) / n, now
        for i, p in enumerate(self.pending):
            bad = bool(skipped[i]) or not math.isfinite(losses[i])
            self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
            if self.nonfinite_run >= t.max_nonfinite_steps and self.abort_at is None:
                self.abort_at = p["step"]
            record = {
                "step": p["step"],
                "tokens": p["step"] * self.tokens_per_step,
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
            evaluated = evaluate and i == n - 1
            if bad or evaluated or p["step"] % t.log_interval == 0 or p["step"] == t.max_steps:
                self.write(record, evaluated)
        self.bar.update(n)
        self.pending = []

    def write(self, record: dict, evaluate: bool) -> None:
        """Print and log one step's record, with an evaluation (losses and samples) first if
        asked."""
        t, main = self.cfg.train, dist.is_main()
        if main:
            self.bar.write(
                f"step {record['step']:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm'] or float('nan'):.3f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | {record['step_ms']:.0f} ms"
                + (" | SKIPPED: non-finite" if record.get("skipped") else "")
            )
        if evaluate:
            record.update(self.validate())
            if self.tokenizer is not None and t.sample_prompts:
                record["samples"] = self.samples()
            if main:
                losses = [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val")]
                self.bar.write("  " + " | ".join(losses))
                for prompt, text in record.get("samples", {}).items():
                    self.bar.write("  sample: " + (prompt + text).replace("\n", "\n    "))
        self.log.write(record)

    def stop_requested(self) -> int:
        """The exit status to stop with after this step, the same on every rank: 128 + N if
        any rank got signal N, CHECKPOINT_WRITE_EXIT if metrics.jsonl could not be written,
        TIME_LIMIT_EXIT if train.time_limit has passed on any rank, else 0 (one vote over the
        CPU group; a signal wins)."""
        limit = self.cfg.train.time_limit
        late = bool(limit) and time.time() - self.started >= limit
        failed = self.log.error is not None
        signum, failed, late = dist.vote_max([self.stop.signum, int(failed), int(late)])
        if signum:
            return 128 + signum
        return CHECKPOINT_WRITE_EXIT if failed else TIME_LIMIT_EXIT if late else 0

    def stopped(self, status: int) -> int:
        if dist.is_main():
            why = (
                f"by a signal ({signal.Signals(status - 128).name})"
                if status > 128
                else f"at train.time_limit ({self.cfg.train.time_limit:g} s)"
                if status == TIME_LIMIT_EXIT
                else f"because metrics.jsonl could not be written ({self.log.error}); free "
                "disk space, then"
            )
            print(
                f"train.py: stopped {why} after step {self.step}; checkpoint "
                f"{latest_checkpoint(self.out_dir)} saved; run the same command to resume",
                file=sys.stderr,
            )
        return status

    def nothing_to_do(self) -> int:
        """A resumed run already at (or past) train.max_steps: say so and what to set."""
        if dist.is_main():
            t = self.cfg.train
            where = "at" if self.step == t.max_steps else "past"
            print(
                f"train.py: {self.out_dir} is already at step {self.step}, {where} "
                f"train.max_steps = {t.max_steps}: nothing to train. To train on, raise it "
                f"(e.g. --train.max_steps={2 * self.step}); the cosine schedule is then the "
                "one of the longer run, so the learning rate rises to its value at this step.",
                file=sys.stderr,
            )
        return 0

    def abort_nonfinite(self) -> int:
        if dist.is_main():
            print(
                f"train.py: aborting: {self.cfg.train.max_nonfinite_steps} consecutive "
                f"non-finite steps up to step {self.abort_at}; they left the parameters "
                "unchanged. The last complete checkpoint is "
                f"{latest_checkpoint(self.out_dir)}; lower optim.lr or check the data, "
                "then run the same command to resume.",
                file=sys.stderr,
            )
        return NONFINITE_EXIT


def _read(values: list) -> list[float | None]:
    """Host floats of per-step values that are device scalars, floats or None (one
    synchronisation for all the device scalars)."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([v.float() for v in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else (None if v is None else float(v)) for v in values]
