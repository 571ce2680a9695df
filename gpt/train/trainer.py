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
import os
import signal
import sys
import time
from pathlib import Path

import torch

from gpt import __version__
from gpt.config import Config
from gpt.data.loader import TokenLoader
from gpt.data.mixture import MixtureLoader, exact_weights
from gpt.data.replay import ReplayLoader
from gpt.data.tokenizer import get_tokenizer
from gpt.eval.validation import eager, eval_samples, validation_loss
from gpt.store import CHECKPOINTS, keep_for, latest_checkpoint
from gpt.train import dist
from gpt.train.checkpointer import Checkpointer, data_fingerprint
from gpt.train.engine import Engine
from gpt.train.finetune import build_model, init_pin
from gpt.train.metrics import flops_per_token, peak_flops, start_wandb
from gpt.train.optim import lr_at
from gpt.train.steplog import StepLog

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
        self.manifest = manifests[cfg.data_sets()[0][0]]  # data.dir's, or the first source's
        self.world = dist.world_size()
        self.out_dir = Path(t.out_dir)
        # the exact weights train.init_from names now: rank 0's, should a base run save a new
        # checkpoint while the ranks start (each resolves it too, so a refusal is everyone's)
        base_pin = dist.broadcast_object(init_pin(cfg))
        self.model = build_model(cfg, base_pin).to(device)
        self.engine = Engine(self.model, cfg, self.world)
        self.checkpointer = Checkpointer(
            cfg, self.engine, manifests, base_pin, self.manifest["encoding"]
        )
        d, f = cfg.data, cfg.finetune
        if d.mixture:  # each source's sequences where the mixture's schedule puts them
            sources = {name: self._loader(d.sources[name], "train", d.mode) for name in d.mixture}
            self.loader = MixtureLoader(sources, d.mixture)
        elif f.replay_fraction:  # replay: the two-source mixture of data.dir and replay_dir
            domain = self._loader(d.dir, "train", d.mode)
            replay = self._loader(f.replay_dir, "train", d.mode)
            self.loader = ReplayLoader(domain, replay, f.replay_fraction)
        else:
            self.loader = self._loader(d.dir, "train", d.mode)
        # a mixture is evaluated on each source (val_loss/<name>) and on their weighted mean
        val_dirs = dict(d.sources) if d.mixture else {"val": d.dir}
        val_dirs = {**val_dirs, **d.extra_val} if t.eval_interval else {}
        self.val_loaders = {
            name: self._loader(v, "val", "sequential") for name, v in val_dirs.items()
        }
        self.step = self.tokens = 0  # optimizer steps taken, tokens trained on (all ranks)
        self.tokens_per_step = cfg.global_batch(self.world) * m.block_size
        self.flops_per_token = flops_per_token(self.model, m.block_size)
        self.tokenizer = get_tokenizer(self.manifest["encoding"]) if t.sample_tokens else None
        self.stop = StopFlag()
        self.started = process_start_time()
        if base_pin is not None and cfg.finetune.lora_rank and dist.is_main():
            try:  # the base run's pruning keeps the checkpoint these adapters train on
                keep_for(Path(base_pin["path"]), self.out_dir)
            except OSError as err:
                print(
                    f"train.py: warning: cannot mark the base {base_pin['path']} as kept "
                    f"({err}); if its run prunes it, these adapters lose their base",
                    file=sys.stderr,
                )

    def _loader(self, data_dir: str, split: str, mode: str) -> TokenLoader:
        t = self.cfg.train
        return TokenLoader(
            data_dir,
            split,
            block_size=self.cfg.model.block_size,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum if split == "train" else 1,
            rank=dist.rank(),
            world_size=self.world,
            seed=t.seed,
            mode=mode,
        )

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``max_steps``; returns the exit status (0, NONFINITE_EXIT,
        CHECKPOINT_WRITE_EXIT, TIME_LIMIT_EXIT, 128 + signal)."""
        t = self.cfg.train
        if self.step >= t.max_steps and self.step > 0:
            return self.nothing_to_do()
        self.log = self.start_log()
        if self.step == 0 and t.init_from != "scratch" and t.eval_interval:
            self.log.evaluation(0, 0, self.evaluate())  # the base model's, before any update
        while self.step < t.max_steps:
            lr = self.set_lr()
            loss_sum = self.train_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            self.log.add(self.step, self.tokens, lr, loss_sum, *self.engine.step_health())
            stop = self.stop_requested()  # a signal, the time limit, a full disk: any rank
            save = self.checkpointer.due(self.step) or bool(stop)
            evaluation = self.evaluate() if self.evaluation_due() else None
            if save or evaluation is not None or self.log.due(self.step):
                self.log.flush(evaluation)  # the only place the loop waits for the device
            if self.log.abort_at is not None:
                return self.abort_nonfinite()
            if save:  # skipped steps left the parameters as they were: safe to save
                self.checkpointer.save(self.step, self.state_dict())
            if stop:
                return self.stopped(stop)
        self.log.close()  # the last step was saved: checkpoints are due at max_steps
        if dist.is_main():
            where = self.out_dir / CHECKPOINTS
            print(f"done: {self.step} steps, {self.tokens:,} tokens; checkpoints in {where}")
        return 0

    def set_lr(self) -> float:
        """The schedule's learning rate for the coming step, set on the optimizer."""
        return self.engine.set_lr(lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps))

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; the sum of their losses on
        this rank, a float64 device scalar (summed as Python floats would be; not read here)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.train.grad_accum):
            x, y = (self._to_device(b) for b in self.loader.next_batch())
            loss_sum += self.engine.micro_step(x, y).detach().double()
        return loss_sum

    def data_progress(self) -> dict[str, int | float]:
        """Tokens and epochs per source of a mixture (replay's too), for metrics.jsonl."""
        return self.loader.progress() if isinstance(self.loader, MixtureLoader) else {}

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy overlaps compute, no stream sync
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    # -- evaluation -----------------------------------------------------------------------

    def evaluation_due(self) -> bool:
        """Every eval_interval-th step and the last (never with eval_interval = 0)."""
        t = self.cfg.train
        return bool(t.eval_interval) and (
            self.step % t.eval_interval == 0 or self.step == t.max_steps
        )

    def evaluate(self) -> dict:
        """Collective: the validation losses, and samples when sample prompts are set."""
        record = self.validate()
        if self.tokenizer is not None and self.cfg.train.sample_prompts:
            record["samples"] = self.samples()
        return record

    def validate(self) -> dict[str, float]:
        """Validation loss of every validation set, averaged over ranks (uncompiled, in eval
        mode: no dropout)."""
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
        named = dict(zip(self.val_loaders, means, strict=True))
        losses = {("val_loss" if n == "val" else f"val_loss/{n}"): v for n, v in named.items()}
        if self.cfg.data.mixture:  # the mixture's own: its sources' losses at its shares
            shares = exact_weights(self.cfg.data.mixture).items()
            losses = {"val_loss": sum(float(w) * named[n] for n, w in shares), **losses}
        if self.cfg.data.name and "val_loss" in losses:
            losses[f"val_loss/{self.cfg.data.name}"] = losses["val_loss"]
        return losses

    def samples(self) -> dict[str, str]:
        """Collective (ZeRO-3 gathers the parameters): a sample of every sample prompt."""
        t = self.cfg.train
        with self.engine.full_parameters(), eager(self.engine.module) as model:
            return eval_samples(model, self.tokenizer, t.sample_prompts, t.sample_tokens, t.seed)

    # -- state ----------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Continue from the latest usable checkpoint of ``out_dir`` (see
        ``Checkpointer.resume``); the checkpoint, or None when starting afresh."""
        resumed = self.checkpointer.resume()
        if resumed is None:
            return None
        path, state = resumed
        self.load_state_dict(state)
        return path

    def state_dict(self) -> dict:
        """``trainer.json``: everything besides DeepSpeed's state needed to continue exactly."""
        import deepspeed

        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "world_size": self.world,
            "config": dataclasses.asdict(self.cfg),
            "data_fingerprint": data_fingerprint(self.manifests, self.cfg.data.mixture),
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "gpt": __version__,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])

    # -- logging and stopping -------------------------------------------------------------

    def start_log(self) -> StepLog:
        t = self.cfg.train
        config = dataclasses.asdict(self.cfg)
        wandb_run = start_wandb(dist.is_main() and t.wandb, self.out_dir, t.wandb_project, config)
        return StepLog(
            t,
            self.out_dir,
            self.step,
            self.tokens_per_step,
            self.flops_per_token,
            peak_flops(self.device, t.dtype),
            wandb_run,
            self.data_progress,
        )

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
                f"non-finite steps up to step {self.log.abort_at}; they left the parameters "
                "unchanged. The last complete checkpoint is "
                f"{latest_checkpoint(self.out_dir)}; lower optim.lr or check the data, "
                "then run the same command to resume.",
                file=sys.stderr,
            )
        return NONFINITE_EXIT
