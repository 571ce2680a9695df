"""Typed configuration: one dataclass per section, loaded from TOML with command-line overrides.

Precedence is defaults < TOML file < command line (``--section.key=value``). Every field
carries a one-line help text (shown by ``--help``). An unknown section or key, or a value of
the wrong type, raises ``ConfigError`` naming the key and listing what is valid. The
``deepspeed`` section is passed on to the DeepSpeed engine's config; which of its keys are
accepted, and of what type, is gpt/train/engine.py's to say (``check_deepspeed_section``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.fileio import write_atomic


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message says what is valid."""


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    below: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field: its default, its one-line help (the ``--help`` text) and its range:
    ``min <= value <= max``, ``value < below``, ``value > above`` (for numbers; None in an
    optional field is always allowed). ``validate_ranges`` enforces them."""
    bounds = {k: v for k, v in (("min", min), ("max", max), ("below", below), ("above", above))}
    metadata = {"help": help, **{k: v for k, v in bounds.items() if v is not None}}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


CHOICES = {
    "model.norm_position": ("pre", "post"),
    "model.position_encoding": ("learned", "sinusoidal", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "relu", "swiglu"),
    "data.mode": ("random", "sequential"),
    "train.dtype": ("fp32", "bf16", "fp16"),
}


@dataclass
class ModelConfig:
    vocab_size: int = option(50257, "Vocabulary size (50257 for the GPT-2 tokenizer).", min=1)
    block_size: int = option(
        1024, "Context length in tokens (also the number of positions).", min=1
    )
    n_layer: int = option(12, "Number of Transformer blocks.", min=1)
    n_head: int = option(12, "Number of query heads per attention layer.", min=1)
    n_embd: int = option(768, "Width of the residual stream.", min=1)
    dropout: float = option(0.0, "Dropout on embeddings and residual branches.", min=0, below=1)
    bias: bool = option(True, "Biases in linear layers and LayerNorms (GPT-2: true).")
    attention: str = option("sdpa", "Attention backend: naive | sdpa | triton.")
    n_kv_head: int | None = option(
        None, "Key/value heads (grouped-query attention); default n_head."
    )
    norm_position: str = option("pre", "Where blocks normalise: pre (GPT-2) | post (Transformer).")
    position_encoding: str = option("learned", "Positions: learned | sinusoidal | rope.")
    norm: str = option("layernorm", "Normalisation: layernorm | rmsnorm.")
    mlp: str = option("gelu", "MLP: gelu (tanh approximation) | relu | swiglu.")
    mlp_hidden_dim: int | None = option(
        None, "MLP hidden width; default 4*n_embd, or ceil8(8/3*n_embd) for swiglu.", min=1
    )
    norm_eps: float = option(1e-5, "Epsilon of LayerNorm / RMSNorm.", above=0)
    rope_theta: float = option(10000.0, "Base of the rotary frequencies.", above=0)
    tie_embeddings: bool = option(True, "LM head shares the token embedding's weights (GPT-2).")
    vocab_multiple: int = option(
        1,
        "Round the embedding and LM-head rows up to a multiple of this (1: no padding); 64 "
        "makes GPT-2's 50257 a fast 50304.",
        min=1,
    )

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        if self.mlp == "swiglu":  # same parameter count as a 4x MLP (Shazeer 2020)
            return 8 * -(-self.n_embd // 3)  # 8/3 * n_embd rounded up to a multiple of 8
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def validate(self) -> None:
        """Raise ConfigError for out-of-range or inconsistent values; called when a model is
        built (and by ``Config.validate`` before any work)."""
        validate_ranges(self, "model")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_head ({self.n_kv_head}) must be a positive divisor of "
                f"model.n_head ({self.n_head})"
            )
        if self.position_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"model.position_encoding = 'rope' needs an even head dimension; "
                f"n_embd / n_head = {self.n_embd // self.n_head}"
            )


@dataclass
class DataConfig:
    dir: str = option("out/data/shakespeare", "Directory written by `python -m gpt.data.prepare`.")
    mode: str = option("random", "Batches: random windows | sequential (each token once/epoch).")
    extra_val: dict[str, str] = option(
        {}, "Extra validation sets, name = prepared dir; logged as val_loss/<name>."
    )
    name: str = option(
        "", "Name of data.dir's validation set: also logged as val_loss/<name> (e.g. domain)."
    )


@dataclass
class TrainConfig:
    out_dir: str = option("out/run", "Run directory: metrics, checkpoints, resolved config.")
    max_steps: int = option(1000, "Optimizer steps to train for.", min=1)
    micro_batch_size: int = option(8, "Sequences per rank per forward/backward.", min=1)
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", min=1)
    global_batch_size: int | None = option(
        None,
        "Sequences per optimizer step over all processes; if set, grad_accum is derived as "
        "global_batch_size / (micro_batch_size * world size), which must divide exactly.",
        min=1,
    )
    eval_interval: int = option(100, "Evaluate every this many steps (0: never).", min=0)
    eval_steps: int = option(20, "Validation batches per evaluation.", min=1)
    ckpt_interval: int = option(500, "Checkpoint every this many steps (and at the end).", min=1)
    keep_checkpoints: int = option(
        3, "Keep the newest this many complete checkpoints (0: keep all).", min=0
    )
    max_nonfinite_steps: int = option(
        5, "Abort after this many consecutive non-finite steps.", min=1
    )
    universal_checkpoint: bool = option(
        True,
        "Also save the whole optimizer state per parameter, so a run resumes on another "
        "number of processes or ZeRO stage (12 bytes per parameter per checkpoint).",
    )
    time_limit: float = option(
        0.0,
        "Stop after the step that ends past this many seconds since the process started, "
        "save a checkpoint and exit with status 5 (0: no limit).",
        min=0,
    )
    dist_timeout: float = option(
        600.0,
        "Seconds a collective waits for the other processes before the job fails (a dead "
        "or hung rank); must exceed the longest checkpoint save.",
        min=10,
    )
    log_interval: int = option(10, "Log a metrics line every this many steps.", min=1)
    seed: int = option(
        1337, "Seed of the model init, the data order and dropout.", min=0, below=2**63
    )
    init_from: str = option(
        "scratch", "scratch, or a model directory (exported or Hugging Face GPT-2) to start from."
    )
    dtype: str = option("fp32", "Precision: fp32 | bf16 | fp16.")
    compile: bool = option(False, "Compile the model with torch.compile.")
    wandb: bool = option(True, "Log to Weights & Biases (offline unless configured).")
    wandb_project: str = option("gpt-pretrain", "Weights & Biases project name.")
    sample_prompts: list[str] = option(["\n"], "Prompts sampled from at each evaluation.")
    sample_tokens: int = option(64, "New tokens per evaluation sample (0: no samples).", min=0)


@dataclass
class OptimConfig:
    lr: float = option(6e-4, "Peak learning rate.", above=0)
    min_lr: float = option(6e-5, "Floor of the cosine decay (at most optim.lr).", min=0)
    warmup_steps: int = option(100, "Linear warmup steps.", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).", min=0)
    beta1: float = option(0.9, "AdamW beta1.", min=0, below=1)
    beta2: float = option(0.95, "AdamW beta2.", min=0, below=1)
    eps: float = option(1e-8, "AdamW epsilon.", above=0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0: off).", min=0)


@dataclass
class FinetuneConfig:
    freeze_embeddings: bool = option(
        False, "Freeze the token and position embeddings (and a head tied to them)."
    )
    freeze_blocks: int = option(0, "Freeze the first this many Transformer blocks.", min=0)
    lora_rank: int = option(0, "LoRA rank (0: off); the base weights are then all frozen.", min=0)
    lora_alpha: float = option(
        16.0, "LoRA scale numerator: the update is alpha/rank * B A.", above=0
    )
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch's input.", min=0, below=1)
    lora_targets: list[str] = option(
        ["attn.c_attn", "attn.c_proj"],
        "Projections that get adapters: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj.",
    )
    replay_dir: str = option("", "A second (general) prepared data set to replay from.")
    replay_fraction: float = option(
        0.0, "Fraction of every batch's sequences drawn from replay_dir.", min=0, below=1
    )


@dataclass
class BenchConfig:
    steps: int = option(0, "Benchmark mode: time this many steps per backend (0: train).", min=0)
    warmup: int = option(
        3, "Untimed steps before the timed ones (compilation happens here).", min=0
    )
    backends: list[str] = option(
        [], "Attention backends to compare (empty: every registered one; unusable ones are listed)."
    )
    compile: list[bool] = option([False, True], "torch.compile settings to compare.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    deepspeed: dict = field(default_factory=dict)  # passed on to DeepSpeed, checked in engine.py

    @property
    def given(self) -> set[str]:
        """The ``section.key`` names set by the config file or the command line (not left at
        their defaults); ``train.init_from`` uses it to tell a contradiction from a default."""
        return self.__dict__.setdefault("_given", set())

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all processes."""
        return self.train.micro_batch_size * self.train.grad_accum * world_size

    def validate(self, world_size: int, manifests: dict[str, dict] | None = None) -> None:
        """Every range and combination check, before any model is built: ConfigError naming
        the key. With train.global_batch_size it derives train.grad_accum for ``world_size``
        (``resolve_grad_accum``). ``manifests`` maps each role of ``data_sets()`` to its data
        manifest; without it the checks against the data are skipped."""
        for section in SECTION_TYPES:
            validate_ranges(getattr(self, section), section)
        self.model.validate()
        from gpt.attention import attention_status  # the registry knows what runs here

        status = attention_status()
        if self.model.attention not in status or status[self.model.attention]:
            valid = ", ".join(n for n, why in status.items() if why is None)
            why = status.get(self.model.attention) or "unknown backend"
            raise ConfigError(
                f"model.attention = {self.model.attention!r} cannot be used here ({why}); "
                f"usable here: {valid}"
            )
        unknown = [n for n in self.bench.backends if n not in status]
        if unknown:
            raise ConfigError(
                f"bench.backends: unknown attention backend(s) {', '.join(unknown)}; "
                f"valid: {', '.join(status)}"
            )
        t, o = self.train, self.optim
        if o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr ({o.min_lr}) must be at most optim.lr ({o.lr})")
        from gpt.train.engine import check_deepspeed_section  # DeepSpeed's keys live there

        check_deepspeed_section(self)
        self.resolve_grad_accum(world_size)
        if not t.out_dir:
            raise ConfigError("train.out_dir must not be empty")
        out = Path(t.out_dir)
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            where = "is a file" if blocking == out else f"lies below the file {blocking}"
            raise ConfigError(
                f"train.out_dir = {t.out_dir!r} {where}; it must be a directory (new or a run's)"
            )
        f = self.finetune
        adapting = [
            f"finetune.{k} = {_toml_value(getattr(f, k))}"
            for k in ("lora_rank", "freeze_embeddings", "freeze_blocks")
            if getattr(f, k)
        ]
        if adapting and t.init_from == "scratch":
            raise ConfigError(
                f"{', '.join(adapting)}: adapting needs a trained model; set train.init_from "
                "to it (a run directory, checkpoint or model directory)"
            )
        from gpt.lora import TARGETS

        bad = sorted(set(f.lora_targets) - set(TARGETS))
        if bad or (f.lora_rank and not f.lora_targets):
            raise ConfigError(
                f"finetune.lora_targets = {f.lora_targets!r}: choose one or more of "
                f"{', '.join(TARGETS)}"
            )
        self.validate_trainable()
        self.validate_val_names()
        if bool(f.replay_fraction) != bool(f.replay_dir):
            raise ConfigError(
                f"finetune.replay_fraction = {f.replay_fraction} and finetune.replay_dir = "
                f"{f.replay_dir!r}: set both (a fraction > 0 of a prepared data set) or neither"
            )
        if t.init_from != "scratch" and not Path(t.init_from).exists():
            raise ConfigError(
                f"train.init_from = {t.init_from!r}: no such file or directory; give a run "
                "directory, a checkpoint, an exported model/ directory, or 'scratch'"
            )
        if manifests is not None:
            self.validate_data(manifests)

    def resolve_grad_accum(self, world_size: int) -> None:
        """With train.global_batch_size set, derive train.grad_accum = global batch /
        (micro_batch_size x world size) in place, so the global batch stays what the config
        says on any number of processes; ConfigError listing what would divide exactly. A
        grad_accum the config sets itself must then agree."""
        t = self.train
        if t.global_batch_size is None:
            return
        if "train.grad_accum" in self.given:
            batch = self.global_batch(world_size)
            if t.global_batch_size != batch:
                raise ConfigError(
                    f"train.global_batch_size = {t.global_batch_size} but micro_batch_size "
                    f"({t.micro_batch_size}) x grad_accum ({t.grad_accum}) x world size "
                    f"({world_size}) = {batch}; change one of them, or leave train.grad_accum "
                    "unset to derive it"
                )
            return
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size = {t.global_batch_size} but micro_batch_size "
                f"({t.micro_batch_size}) x world size ({world_size}) = {per_step} does not "
                f"divide it, so no train.grad_accum gives that batch; "
                f"{batch_suggestions(t.global_batch_size, t.micro_batch_size, world_size)}"
            )
        t.grad_accum = t.global_batch_size // per_step

    def validate_trainable(self) -> None:
        """[finetune] against the model's shape (the checkpoint's, with train.init_from): a
        LoRA rank the targeted layers can hold, and something left to train."""
        m, f = self.model, self.finetune
        if f.freeze_blocks > m.n_layer:
            raise ConfigError(
                f"finetune.freeze_blocks = {f.freeze_blocks}, but the model has "
                f"{m.n_layer} blocks; use at most {m.n_layer}"
            )
        from gpt.lora import max_rank
        from gpt.memory import param_counts

        if f.lora_rank:
            bound, layer = max_rank(m, f.lora_targets)
            if f.lora_rank > bound:
                raise ConfigError(
                    f"finetune.lora_rank = {f.lora_rank} is larger than the targeted layers: "
                    f"a rank-r update of an (out x in) weight has rank at most min(in, out), "
                    f"and {layer}; use finetune.lora_rank <= {bound}"
                )
        if self.train.init_from == "scratch" or param_counts(self)[1]:
            return
        if f.lora_rank:
            raise ConfigError(
                f"finetune.lora_rank = {f.lora_rank} with finetune.freeze_blocks = "
                f"{f.freeze_blocks} (every block) leaves nothing to train: LoRA freezes every "
                "base weight, and a frozen block's adapters too; set finetune.freeze_blocks "
                f"below {m.n_layer} (0: adapters in every block)"
            )
        raise ConfigError(
            f"finetune.freeze_embeddings = true with finetune.freeze_blocks = {f.freeze_blocks} "
            "(every block) leaves nothing to train (the head is tied to the embedding and the "
            "model has no final norm); set finetune.freeze_blocks below "
            f"{m.n_layer} or finetune.freeze_embeddings = false"
        )

    def validate_val_names(self) -> None:
        """A data.extra_val name must not stand for another set: the names "train", "val"
        and "replay" are the roles of data.dir and finetune.replay_dir, and data.name is
        already logged as val_loss/<data.name>."""
        for name in self.data.extra_val:
            if name in RESERVED_VAL_NAMES or not name:
                raise ConfigError(
                    f"data.extra_val.{name}: the name {name!r} is reserved "
                    f"({', '.join(RESERVED_VAL_NAMES)} name data.dir's sets and the replay "
                    "set, and the name must not be empty); choose another name"
                )
            if name == self.data.name:
                raise ConfigError(
                    f"data.extra_val.{name}: {name!r} is data.name, the name data.dir's own "
                    "validation set is logged under (val_loss/" + name + "); choose another "
                    "name for one of them"
                )

    def data_sets(self) -> list[tuple[str, str, str]]:
        """(role, config key, directory) of every prepared data set the run reads: "train"
        (data.dir), "replay" (finetune.replay_dir, if set) and "extra_val/<name>" for each
        data.extra_val set, a role no other set can take."""
        sets = [("train", "data.dir", self.data.dir)]
        if self.finetune.replay_dir:
            sets.append(("replay", "finetune.replay_dir", self.finetune.replay_dir))
        for name, directory in self.data.extra_val.items():
            sets.append((f"extra_val/{name}", f"data.extra_val.{name}", directory))
        return sets

    def validate_data(self, manifests: dict[str, dict]) -> None:
        """Checks of the config against the prepared data (see ``validate``)."""
        t, m = self.train, self.model
        window = m.block_size + 1  # one sequence: block_size inputs and the next token
        for role, key, directory in self.data_sets():
            manifest = manifests[role]
            if manifest["n_vocab"] > m.vocab_size:
                raise ConfigError(
                    f"{key} = {directory} uses {manifest['encoding']} with "
                    f"{manifest['n_vocab']} tokens, more than model.vocab_size = {m.vocab_size}"
                )
            splits = {"train": ["train", "val"], "replay": ["train"]}.get(role, ["val"])
            if not t.eval_interval:
                splits = [s for s in splits if s == "train"]
            for split in splits:
                tokens = manifest["splits"].get(split, {}).get("tokens", 0)
                if tokens < window:
                    need = "set train.eval_interval = 0 or " if split == "val" else ""
                    raise ConfigError(
                        f"{key} = {directory}: split {split!r} has {tokens} tokens, fewer than "
                        f"one sequence of model.block_size + 1 = {window}; {need}prepare "
                        "more data (or a smaller model.block_size)"
                    )


RESERVED_VAL_NAMES = ("train", "val", "replay")


def batch_suggestions(global_batch: int, micro: int, world: int) -> str:
    """What makes a global batch divide: micro-batch sizes up to ``micro`` that divide
    global_batch / world, and the nearest global batches ``micro`` x ``world`` divides."""
    lower = global_batch // (micro * world) * micro * world
    nearest = [n for n in (lower, lower + micro * world) if n > 0]
    hint = f"train.global_batch_size = {' or '.join(map(str, nearest))}"
    if global_batch % world == 0:
        per_rank = global_batch // world
        fits = [b for b in range(micro, 0, -1) if per_rank % b == 0][:4]
        options = ", ".join(f"{b} (grad_accum {per_rank // b})" for b in fits)
        hint = f"train.micro_batch_size = {options}; or {hint}"
    return f"these would work on {world} process(es): {hint}"


def validate_ranges(section_cfg: Any, section: str) -> None:
    """ConfigError naming the key for a value outside its field's choices or range, or a
    float that is not finite."""
    for f in dataclasses.fields(section_cfg):
        value, key, meta = getattr(section_cfg, f.name), f"{section}.{f.name}", f.metadata
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(
                f"{key} = {value!r} is not valid; choose one of {', '.join(CHOICES[key])}"
            )
        if value is None or isinstance(value, (bool, str, list, dict)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        lo, hi = meta.get("min", meta.get("above")), meta.get("max", meta.get("below"))
        ok = (
            ("min" not in meta or value >= meta["min"])
            and ("above" not in meta or value > meta["above"])
            and ("max" not in meta or value <= meta["max"])
            and ("below" not in meta or value < meta["below"])
        )
        if ok or (lo is None and hi is None):
            continue
        if lo is not None and hi is not None:
            left, right = "[" if "min" in meta else "(", "]" if "max" in meta else ")"
            rule = f"in {left}{lo}, {hi}{right}"
        elif lo is not None:
            rule = f"{'>=' if 'min' in meta else '>'} {lo}"
            if isinstance(value, int) and "min" in meta and lo in (0, 1):
                rule = "a positive integer" if lo == 1 else "an integer >= 0"
        else:
            rule = f"{'<=' if 'max' in meta else '<'} {hi}"
        raise ConfigError(f"{key} must be {rule}, got {value}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "finetune": FinetuneConfig,
    "bench": BenchConfig,
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp)) if not typing.get_args(tp) else str(tp)


def _matches(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an integer literal is a fine float; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, kt) and _matches(v, vt) for k, v in value.items()
        )
    if origin is list:
        (et,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, et) for v in value)
    return isinstance(value, tp)


def _section_fields(section: str) -> dict[str, tuple[Any, str]]:
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def _set(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
    if section == "deepspeed":
        node = cfg.deepspeed
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(["deepspeed", *parents[: depth + 1]])
                raise ConfigError(
                    f"{origin}: {where} is {node!r}, not a table, so deepspeed.{key} cannot be "
                    f"set; set {where} as a table (--{where}.KEY=VALUE) or leave out one of them"
                )
        node[leaf] = value
        return
    fields = _section_fields(section)
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(fields)}"
        )
    tp = fields[key][0]
    if not _matches(value, tp):
        raise ConfigError(
            f"{origin}: {section}.{key} must be {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__})"
        )
    if tp is float or (isinstance(tp, types.UnionType) and float in typing.get_args(tp)):
        value = float(value) if isinstance(value, int) else value
    setattr(getattr(cfg, section), key, value)
    cfg.given.add(f"{section}.{key}")


def _parse_value(text: str) -> Any:
    """A command-line value is read as a TOML value (42, 3e-4, true, "x", [1, 2]); anything
    that is not valid TOML is taken as a bare string, and none/null mean None."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path``, then ``--section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); TOML files are UTF-8"
            ) from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: top-level key {section!r} must be a [section]; valid sections: "
                    f"{', '.join(SECTIONS)}"
                )
            for key, value in table.items():
                _set(cfg, section, key, value, str(path))
    for arg in overrides:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"command line: {arg!r} has no value; write --{name}=VALUE")
        section, _, key = name.partition(".")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"command line: --{name} holds bytes that are not UTF-8 text; give the value "
                "in UTF-8"
            ) from None
        _set(cfg, section, key, _parse_value(text), "command line")
    return cfg


def config_help() -> str:
    """Every key with its type, default and one-line description."""
    lines = []
    defaults = Config()
    for section in SECTION_TYPES:
        lines.append(f"[{section}]")
        for key, (tp, help) in _section_fields(section).items():
            default = getattr(getattr(defaults, section), key)
            lines.append(f"  --{section}.{key}=<{_type_name(tp)}>  {help} (default: {default!r})")
    lines.append("[deepspeed]")
    lines.append(
        "  --deepspeed.<key>[.<key>...]=<value>  passed on to the DeepSpeed config (the keys "
        "are listed in docs/configuration.md)"
    )
    return "\n".join(lines)


def _range_text(meta: dict, key: str) -> str:
    if key in CHOICES:
        return " \\| ".join(CHOICES[key])
    lo, hi = meta.get("min", meta.get("above")), meta.get("max", meta.get("below"))
    if lo is None and hi is None:
        return ""
    left = ("[" if "min" in meta else "(") + f"{lo}" if lo is not None else "(-inf"
    right = f"{hi}" + ("]" if "max" in meta else ")") if hi is not None else "inf)"
    return f"{left}, {right}"


SECTION_HELP = {
    "model": "The network's shape and switches (gpt/model.py). With `train.init_from` the shape "
    "comes from the checkpoint.",
    "data": "The prepared data set (`python -m gpt.data.prepare`, docs/data.md).",
    "train": "The run: steps, batch, evaluation, checkpoints, logging, precision.",
    "optim": "AdamW and the learning-rate schedule (linear warmup, cosine decay).",
    "finetune": "Adapting a model loaded with `train.init_from` (docs/finetune.md).",
    "bench": "The trainer's benchmark mode (`--bench.steps=N`; docs/performance.md).",
}


def config_markdown() -> str:
    """docs/configuration.md: every section and key with its type, default, valid range and
    description (``python -m gpt.config > docs/configuration.md``; a test keeps it current)."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `gpt/config.py` by `python -m gpt.config > docs/configuration.md`.",
        "A run's config is a TOML file of these sections; any key can be overridden on the",
        "command line as `--section.key=value` (a TOML value). Precedence: defaults < file <",
        "command line. Every value is checked before any work: an unknown key, a wrong type or",
        "a value outside its range exits with status 2 and a message naming the key. Relative",
        "paths are relative to the directory `train.py` runs in.",
        "",
    ]
    defaults = Config()
    for section, cls in SECTION_TYPES.items():
        out += [f"## [{section}]", "", SECTION_HELP[section], ""]
        out += ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
        for key, (tp, help) in _section_fields(section).items():
            value = getattr(getattr(defaults, section), key)
            default = "(none)" if value is None else f"`{_toml_value(value)}`"
            meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
            cells = [
                f"`{key}`",
                _type_name(tp).replace("|", "or"),
                default,
                _range_text(meta, f"{section}.{key}"),
                help.replace("|", "\\|"),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    from gpt.train.engine import DEEPSPEED_KEYS, DEEPSPEED_REFUSED

    out += [
        "## [deepspeed]",
        "",
        "Passed on to DeepSpeed's config, merged over what `gpt/train/engine.py` derives",
        "(batch sizes, ZeRO stage, precision). Only the keys below are passed on, each checked",
        "(a key DeepSpeed would ignore, or one misspelt, is an error naming it). Example:",
        "`--deepspeed.zero_optimization.stage=2`.",
        "",
        "| key | valid |",
        "|---|---|",
        *(f"| `{k}` | {rule} |" for k, (rule, _) in DEEPSPEED_KEYS.items()),
        "",
        '`fp16.*` apply with `train.dtype = "fp16"` only; `bf16.enabled = true` (bf16',
        "weights and DeepSpeed's optimizer wrapper instead of autocast) needs",
        '`train.dtype = "bf16"`.',
        "",
        "Refused, because the trainer derives them, overrides them or does not use them:",
        "",
        "| key | why | set instead |",
        "|---|---|---|",
        *(f"| `{k}` | {why} | {instead} |" for k, (why, instead) in DEEPSPEED_REFUSED.items()),
        "",
    ]
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, every other
    character as itself (JSON's ensure_ascii escapes would split a character outside the
    Basic Multilingual Plane into two surrogate escapes, which TOML refuses)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError(f"{text!r}: holds a lone surrogate, which is not text TOML can hold")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _derived_grad_accum(cfg: Config) -> bool:
    return cfg.train.global_batch_size is not None and "train.grad_accum" not in cfg.given


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config.
    None values are left out: every optional field defaults to None."""
    out = []
    for section in SECTIONS:
        table = (
            dataclasses.asdict(getattr(cfg, section)) if section != "deepspeed" else cfg.deepspeed
        )
        if section == "train" and _derived_grad_accum(cfg):
            table.pop("grad_accum")  # it follows the world size: re-derived when read back
        out.append(f"[{section}]")
        out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        out.append("")
    return "\n".join(out)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, to_toml(cfg))


def config_from_argv(argv: list[str], prog: str = "train.py") -> tuple[Path | None, Config]:
    """``prog [CONFIG.toml] [--section.key=value ...]`` with ``--help``; a bad config exits
    with status 2 and the message on stderr, as argparse does."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [CONFIG.toml] [--section.key=value ...]\n\n{config_help()}")
        raise SystemExit(0)
    path = Path(argv[0]) if argv and not argv[0].startswith("--") else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return path, cfg


if __name__ == "__main__":
    print(config_markdown(), end="")
