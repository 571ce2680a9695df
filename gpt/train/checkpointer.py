"""The checkpoints of a training run, as the loop sees them: when to save (``due``),
saving (a LoRA run's adapters and their base pin, the universal state when asked), keeping
the ``keep_checkpoints`` newest, and resuming from the latest usable one under the resume
policy (the same model shape, data set, LoRA base; a layout change through the universal
state). How a checkpoint is written and read is gpt/train/checkpoint.py's.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from gpt.config import COMPUTE_KEYS, Config, ConfigError
from gpt.data.mixture import exact_weights
from gpt.data.run_data import trains_on
from gpt.fileio import write_atomic
from gpt.store import (
    ADAPTERS,
    LATEST,
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    pinned_checkpoints,
    read_adapter_info,
    verify_checksums,
)
from gpt.train import checkpoint as ckpt
from gpt.train import dist
from gpt.train.engine import Engine
from gpt.train.universal import has_universal


class Checkpointer:
    """Saves and resumes the checkpoints of ``cfg.train.out_dir`` for ``engine``.
    ``base_pin`` is the pin of train.init_from (LoRA adapters name it as their base),
    ``encoding`` the tokenizer saved beside the weights."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        manifests: dict[str, dict],
        base_pin: dict | None,
        encoding: str,
    ):
        self.cfg, self.engine, self.manifests = cfg, engine, manifests
        self.base_pin, self.encoding = base_pin, encoding
        self.out_dir = Path(cfg.train.out_dir)
        self.good: list[Path] = []  # checkpoints this process wrote or resumed from: prunable

    def due(self, step: int) -> bool:
        """Every ckpt_interval-th step and the last."""
        t = self.cfg.train
        return step % t.ckpt_interval == 0 or step == t.max_steps

    def save(self, step: int, trainer_state: dict) -> Path:
        """Collective: a complete checkpoint of ``step``, then the older ones beyond
        keep_checkpoints pruned. A LoRA run saves its adapters only."""
        f = self.cfg.finetune
        adapters = None
        if f.lora_rank:
            adapters = dict(
                rank=f.lora_rank,
                alpha=f.lora_alpha,
                targets=f.lora_targets,
                base=self.base_pin,
                tokenizer=self.encoding,
            )
        universal = self.cfg.train.universal_checkpoint
        final = ckpt.save_checkpoint(
            self.engine.ds,
            self.out_dir,
            step,
            trainer_state,
            tokenizer=self.encoding,
            adapters=adapters,
            universal_from=self.engine.optimizer if universal else None,
        )
        keep = self.cfg.train.keep_checkpoints
        self.good = [*self.good, final][-keep:] if keep else [*self.good, final]
        if dist.is_main():
            prune_checkpoints(self.out_dir, keep, self.good)
        return final

    def resume(self) -> tuple[Path, dict] | None:
        """The latest usable checkpoint of ``out_dir`` and its trainer state, the engine
        (model, optimizer) and RNG restored from it; None when there is none. A damaged newer
        one is skipped with a warning naming the file, and set aside (renamed, never deleted)
        once an older one loaded. A checkpoint of another number of processes or ZeRO stage
        loads through its universal state. ConfigError if it belongs to another model, data
        set or LoRA base, or cannot be loaded here."""
        damaged = []
        world = dist.world_size()
        for path in reversed(complete_checkpoints(self.out_dir)):
            try:
                saved = ckpt.read_trainer_state(path)
                universal = check_resume(self.cfg, saved, self.manifests, world, path)
                self.check_base(path)
                saved = ckpt.load_checkpoint(
                    self.engine.ds,
                    path,
                    universal_into=self.engine.optimizer if universal else None,
                )
            except CheckpointError as err:
                damaged.append((path, str(err)))
                if dist.is_main():
                    print(f"train.py: warning: skipping checkpoint {path}: {err}", file=sys.stderr)
                continue
            if universal and dist.is_main():
                print(
                    f"train.py: {path.name} was saved by {saved['world_size']} process(es) "
                    f"with ZeRO stage {zero_stage_of(saved)}: loaded from its universal/ state",
                    file=sys.stderr,
                )
            self.good = [path]
            if damaged:
                dist.barrier()  # every rank is done reading them
            if dist.is_main() and damaged:  # out of the way, kept for a look
                for bad, why in damaged:
                    ckpt.set_aside(bad, f"skipped as damaged: {why}")
                write_atomic(path.parent / LATEST, path.name)
            return path, saved
        if damaged:  # never start afresh over a run whose every checkpoint is unusable
            raise ConfigError(
                f"{self.out_dir}: no usable checkpoint ({'; '.join(w for _, w in damaged)}); "
                "restore one, or move the checkpoints directory away to start afresh"
            )
        return None

    def check_base(self, path: Path) -> None:
        """A LoRA checkpoint resumes only on the base its adapters were trained on: ConfigError
        naming it when train.init_from now holds other weights."""
        adapters = path / ADAPTERS
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


def prune_checkpoints(out_dir: str | Path, keep: int, good: list[Path]) -> list[Path]:
    """Rank 0: delete the checkpoints older than the ``keep`` newest of ``good`` (those this
    process wrote or resumed from, verified then); 0 keeps everything. Only complete
    checkpoints whose checksum table still lists exactly the files present are deleted (their
    contents are not hashed again: they are going), one that fails is set aside instead, and
    nothing newer than the oldest kept one, nothing a LoRA run pinned as its base
    (``store.pinned_checkpoints``), nor anything the trainer did not write (see
    ``is_complete``) is touched. A deletion that fails is a warning, never an error: the
    other ranks are already training on. Returns what was deleted."""
    kept = sorted(good, key=checkpoint_step)[-keep:] if keep > 0 else []
    if not kept:
        return []
    oldest_kept = checkpoint_step(kept[0])
    pinned = pinned_checkpoints(out_dir)
    deleted = []
    for old in complete_checkpoints(out_dir):
        if checkpoint_step(old) >= oldest_kept:
            break
        if old.name in pinned:  # the base of a LoRA run's adapters
            continue
        try:
            try:
                verify_checksums(old, only="")  # the table and the files present agree
            except CheckpointError as err:
                ckpt.set_aside(old, f"damaged, so not pruned: {err}")
                continue
            doomed = old.with_name(old.name + ".tmp")  # incomplete from the first byte deleted
            old.rename(doomed)
            shutil.rmtree(doomed)
            deleted.append(old)
        except OSError as err:
            print(f"train.py: warning: could not prune {old}: {err}", file=sys.stderr)
    return deleted


def data_fingerprint(
    manifests: dict[str, dict], mixture: dict[str, float] | None = None
) -> dict[str, list | dict]:
    """What identifies the data a run trains on: per role that training reads (data.dir's
    "train", the replay set's, or each mixture source's "mixture/<name>") its shard files and
    their CRCs, and with data.mixture its exact shares under "mixture", in order. Validation
    sets are left out: adding one to a run is allowed."""
    fingerprint: dict[str, list | dict] = {
        role: sorted(
            [s["file"], s["crc32"]] for split in m["splits"].values() for s in split["shards"]
        )
        for role, m in manifests.items()
        if trains_on(role)
    }
    if mixture:
        fingerprint["mixture"] = {name: str(w) for name, w in exact_weights(mixture).items()}
    return fingerprint


def check_resume(
    cfg: Config, saved: dict, manifests: dict[str, dict], world: int, ckpt: Path
) -> bool:
    """Refuse (ConfigError), before the first step, to resume what would not continue the
    same run: another model shape, another data set, or another mixture of data sets.
    Returns whether the checkpoint must be loaded through its universal state
    (``needs_universal``)."""
    changed = [
        f"model.{k}: {v!r} -> {getattr(cfg.model, k)!r}"
        for k, v in saved["config"]["model"].items()
        if k not in COMPUTE_KEYS and getattr(cfg.model, k) != v
    ]
    if changed:
        raise ConfigError(
            f"{ckpt}: cannot resume with a different model shape: {'; '.join(changed)}"
        )
    then, now = saved["data_fingerprint"], data_fingerprint(manifests, cfg.data.mixture)
    if isinstance(then, list):  # written before roles: data.dir's shards only
        then = {"train": then, **({"replay": now["replay"]} if "replay" in now else {})}
    mix_then, mix_now = then.get("mixture", {}), now.get("mixture", {})
    if list(mix_then.items()) != list(mix_now.items()):
        raise ConfigError(
            f"{ckpt}: cannot resume: it was trained {_mixture_text(mix_then)}, this run "
            f"{_mixture_text(mix_now)}; put data.mixture back as it was (the same sources, "
            "order and shares), or start a new run from this checkpoint with "
            f"--train.init_from={ckpt} to train on another mixture"
        )
    now_sets = {role: (key, directory) for role, key, directory in cfg.data_sets()}
    for role in sorted((set(then) | set(now)) - {"mixture"}):
        if then.get(role) == now.get(role):
            continue
        if role in now_sets:
            key, directory = now_sets[role]
            what = f"{key} = {directory!r} now holds different shards than when the checkpoint "
            what += "was written, or none"
        else:
            key = {"train": "data.dir", "replay": "finetune.replay_dir"}.get(role)
            key = key or f"data.sources.{role.removeprefix('mixture/')}"
            what = f"{key} is not set now, but the checkpoint trained on it"
        raise ConfigError(f"{ckpt}: cannot resume: the data set changed ({what})")
    return needs_universal(cfg, saved, world, ckpt)


def _mixture_text(shares: dict[str, str]) -> str:
    if not shares:
        return "without data.mixture"
    return "on data.mixture = {" + ", ".join(f"{n} = {w}" for n, w in shares.items()) + "}"


def needs_universal(cfg: Config, saved: dict, world: int, ckpt: Path) -> bool:
    """Whether ``ckpt`` must be loaded through its universal state: when the layout of the
    training state (number of processes, ZeRO stage, dtype) changed, unless DeepSpeed's own
    files hold it whole (ZeRO stage 0 on both sides, same dtype). ConfigError when neither
    can be loaded into this run."""
    then = (saved["world_size"], zero_stage_of(saved), saved["config"]["train"]["dtype"])
    now = (world, cfg.zero_stage, cfg.train.dtype)
    if then == now or (then[1] == now[1] == 0 and then[2] == now[2]):
        return False
    # DeepSpeed wraps our optimizer in stage 0 with fp16/bf16: its state is not per parameter
    if has_universal(ckpt) and (cfg.zero_stage > 0 or cfg.train.dtype == "fp32"):
        return True
    layout = "{} process(es), ZeRO stage {}, dtype {}"
    why = (
        "it has no universal/ state (saved with train.universal_checkpoint = false, or by an "
        "older version)"
        if not has_universal(ckpt)
        else "its universal/ state loads into ZeRO stage 1-3, or stage 0 with fp32"
    )
    raise ConfigError(
        f"{ckpt}: saved by {layout.format(*then)}, resumed by {layout.format(*now)}: {why}; "
        f"resume with {then[0]} process(es), deepspeed.zero_optimization.stage = {then[1]} "
        f"and train.dtype = {then[2]!r}"
    )


def zero_stage_of(trainer_state: dict) -> int:
    """The ZeRO stage a checkpoint was saved with (from its trainer.json)."""
    return trainer_state["config"].get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
