"""Typed configuration: one dataclass per section, and its validation.

Every field carries a default, a one-line help text (shown by ``--help``) and its valid range
or choices; ``Config.validate`` checks every value and combination before any work and raises
``ConfigError`` naming the key and saying what is valid. Reading and writing TOML and the
command line are gpt/config_io.py's; the checks against the prepared data are
gpt/data/run_data.py's. The ``deepspeed`` section is passed on to the DeepSpeed engine's
config; which of its keys are accepted, and of what type, is gpt/train/engine.py's to say
(``check_deepspeed_section``).

Validation asks the attention registry (gpt/attention.py) which backends run here, so this
module imports torch. gpt/lora.py, gpt/memory.py and gpt/train/engine.py take a config
themselves, so their checks are imported where they are called, not at the top. The module
runs past 600 lines because every key carries its help text and range beside it, and every
combination its check.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.attention import attention_status, canonical_attention_name
from gpt.rope import resolve_scaling, scaled_length
from gpt.sdpa import check_sdpa_kernels


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
# the projections of a block that may carry LoRA adapters, by their names in the block
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# The most positions a model may run (block_size, or with model.rope_scaling its scaled
# length): 2^24, past every context trained today. Position tables are built for all of them
# when the model is, so a mistyped block_size or factor is refused here, not by an allocator.
MAX_POSITIONS = 1 << 24


@dataclass
class ModelConfig:
    vocab_size: int = option(50257, "Vocabulary size (50257 for the GPT-2 tokenizer).", min=1)
    block_size: int = option(
        1024, "Context length in tokens (also the number of positions).", min=1, max=MAX_POSITIONS
    )
    n_layer: int = option(12, "Number of Transformer blocks.", min=1)
    n_head: int = option(12, "Number of query heads per attention layer.", min=1)
    n_embd: int = option(768, "Width of the residual stream.", min=1)
    dropout: float = option(0.0, "Dropout on embeddings and residual branches.", min=0, below=1)
    bias: bool = option(True, "Biases in linear layers and LayerNorms (GPT-2: true).")
    attention: str = option("sdpa", "Attention backend: naive | sdpa | triton.")
    sdpa_kernels: list[str] = option(
        [],
        "With attention = sdpa, PyTorch's kernels to try, in priority order: cudnn | flash | "
        "efficient | math (empty: auto, cudnn first on a Hopper GPU); see gpt/sdpa.py.",
    )
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
    rope_scaling: dict[str, str | int | float | bool] = option(
        {},
        "Rotary scaling past the trained context, a table: type = linear | dynamic | yarn | "
        "llama3, factor, original_max_position_embeddings, ... (docs/long-context.md); "
        "empty: none.",
    )
    tie_embeddings: bool = option(True, "LM head shares the token embedding's weights (GPT-2).")
    vocab_multiple: int = option(
        1,
        "Round the embedding and LM-head rows up to a multiple of this (1: no padding); 64 "
        "makes GPT-2's 50257 a fast 50304.",
        min=1,
    )
    loss_chunk: int = option(
        0,
        "Cross-entropy over chunks of this many tokens, the logits never held in full "
        "(gpt/loss.py; training returns no logits); 0: the plain loss.",
        min=0,
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
    def resolved_rope_scaling(self) -> dict:
        """model.rope_scaling with every default filled in ({}: no scaling; gpt/rope.py)."""
        return resolve_scaling(self.rope_scaling)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model runs: block_size (the trained context), or with
        model.rope_scaling the larger of it and factor x original_max_position_embeddings."""
        if self.position_encoding != "rope":
            return self.block_size
        return scaled_length(self.block_size, self.resolved_rope_scaling)

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
        try:
            check_sdpa_kernels(self.sdpa_kernels)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.position_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"model.position_encoding = 'rope' needs an even head dimension; "
                f"n_embd / n_head = {self.n_embd // self.n_head}"
            )
        try:
            resolve_scaling(self.rope_scaling)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.rope_scaling and self.position_encoding != "rope":
            raise ConfigError(
                f"model.rope_scaling scales rotary positions, but model.position_encoding = "
                f"{self.position_encoding!r}; set it to 'rope' or leave model.rope_scaling empty"
            )
        if (n := self.max_positions) > MAX_POSITIONS:
            raise ConfigError(
                f"model.rope_scaling runs factor x original_max_position_embeddings = "
                f"{f'{n:,}' if n < 10**15 else f'{n:.3g}'} positions, more than the "
                f"{MAX_POSITIONS:,} a model may run; use a smaller factor"
            )


# [model] keys that change how the model computes, not its weights: a run may resume with
# other values, and fine-tuning (train.init_from) may set them (plus vocab_multiple, whose
# padding rows the loaded weights do not hold)
COMPUTE_KEYS = ("attention", "dropout", "sdpa_kernels", "loss_chunk")


@dataclass
class DataConfig:
    dir: str = option(
        "out/data/shakespeare",
        "Directory written by `python -m gpt.data.prepare` (not read with data.mixture).",
    )
    mode: str = option("random", "Batches: random windows | sequential (each token once/epoch).")
    extra_val: dict[str, str] = option(
        {}, "Extra validation sets, name = prepared dir; logged as val_loss/<name>."
    )
    name: str = option(
        "", "Name of data.dir's validation set: also logged as val_loss/<name> (e.g. domain)."
    )
    mixture: dict[str, float] = option(
        {},
        "Train on several prepared sets: name = weight (> 0, relative: normalised to sum 1), "
        "each name's directory in data.sources; data.dir is then not read "
        "(docs/data.md#mixtures). Empty: data.dir alone.",
    )
    sources: dict[str, str] = option(
        {}, "The directories of data.mixture's sets: name = prepared dir, one per name."
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
    activation_checkpointing: bool = option(
        False,
        "Keep only each Transformer block's input and recompute the block in the backward "
        "pass: less activation memory for about a third more compute (docs/training.md).",
    )
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
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
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

    def validate(self, world_size: int) -> None:
        """Every range and combination check, before any model is built: ConfigError naming
        the key. With train.global_batch_size it derives train.grad_accum for ``world_size``
        (``resolve_grad_accum``). The checks against the prepared data are
        ``gpt.data.run_data.check_run_data``."""
        for section in SECTION_TYPES:
            validate_ranges(getattr(self, section), section)
        self.model.validate()
        status = attention_status()
        attention = canonical_attention_name(self.model.attention)  # old names still load
        if attention not in status or status[attention]:
            valid = ", ".join(n for n, why in status.items() if why is None)
            why = status.get(attention) or "unknown backend"
            raise ConfigError(
                f"model.attention = {self.model.attention!r} cannot be used here ({why}); "
                f"usable here: {valid}"
            )
        t, o = self.train, self.optim
        if o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr ({o.min_lr}) must be at most optim.lr ({o.lr})")
        from gpt.train.engine import check_deepspeed_section  # engine.py imports this module

        check_deepspeed_section(self)
        if self.model.loss_chunk and self.zero_stage == 3:
            raise ConfigError(
                f"model.loss_chunk = {self.model.loss_chunk} reads the LM head's weight outside "
                "its module, which ZeRO stage 3 has not gathered; use model.loss_chunk = 0 "
                "or deepspeed.zero_optimization.stage <= 2"
            )
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
            f"finetune.{k} = {str(getattr(f, k)).lower()}"  # an int, or true as TOML writes it
            for k in ("lora_rank", "freeze_embeddings", "freeze_blocks")
            if getattr(f, k)
        ]
        if adapting and t.init_from == "scratch":
            raise ConfigError(
                f"{', '.join(adapting)}: adapting needs a trained model; set train.init_from "
                "to it (a run directory, checkpoint or model directory)"
            )
        bad = sorted(set(f.lora_targets) - set(LORA_TARGETS))
        if bad or (f.lora_rank and not f.lora_targets):
            raise ConfigError(
                f"finetune.lora_targets = {f.lora_targets!r}: choose one or more of "
                f"{', '.join(LORA_TARGETS)}"
            )
        self.validate_trainable()
        self.validate_val_names()
        self.validate_mixture()
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
        # both modules build on gpt.model, which imports this module
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

    def validate_mixture(self) -> None:
        """data.mixture names sets with a positive weight each and data.sources their
        directories, one per name; the names are logged (tokens/<name>, val_loss/<name>), so
        they must be plain and stand for no other set. Replay (finetune.replay_*) is the
        two-source mixture, so the two are not combined."""
        d, f = self.data, self.finetune
        if d.sources and not d.mixture:
            raise ConfigError(
                f"data.sources = {d.sources} but data.mixture is empty: give each source a "
                "weight in data.mixture (e.g. data.mixture = {web = 0.7, code = 0.3}), or "
                "remove data.sources (a validation-only set belongs in data.extra_val)"
            )
        if not d.mixture:
            return
        if f.replay_dir or f.replay_fraction:
            raise ConfigError(
                "finetune.replay_dir / replay_fraction and data.mixture: replay is the "
                "two-source mixture, so with data.mixture add the replay set to it as a source "
                "(data.mixture = {domain = 0.9, general = 0.1} with both in data.sources) and "
                "leave finetune.replay_* unset"
            )
        for name, weight in d.mixture.items():
            if not MIXTURE_NAME.fullmatch(name) or name in RESERVED_VAL_NAMES:
                raise ConfigError(
                    f"data.mixture.{name}: the name {name!r} is not valid: use letters, digits, "
                    f"'_', '-' and '.', and none of {', '.join(RESERVED_VAL_NAMES)} (they name "
                    "data.dir's sets and the replay set)"
                )
            if name in d.extra_val:
                raise ConfigError(
                    f"data.mixture.{name} and data.extra_val.{name}: a mixture's sets are "
                    f"evaluated as val_loss/<name> already; rename or remove data.extra_val.{name}"
                )
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(
                    f"data.mixture.{name} = {weight}: a weight must be a number > 0 (weights "
                    "are relative: {web = 7, code = 3} is 70% and 30%)"
                )
        missing = [name for name in d.mixture if name not in d.sources]
        if missing:
            raise ConfigError(
                f'data.mixture.{missing[0]} has no directory: add {missing[0]} = "DIR" to '
                f"data.sources (it names {', '.join(d.sources) or 'none'})"
            )
        extra = [name for name in d.sources if name not in d.mixture]
        if extra:
            raise ConfigError(
                f"data.sources.{extra[0]} is not in data.mixture: give it a weight there, or "
                "remove it (a validation-only set belongs in data.extra_val)"
            )
        if d.name:
            raise ConfigError(
                f"data.name = {d.name!r} names data.dir's validation set, which a mixture run "
                "does not read (each source's is logged as val_loss/<name>); leave data.name "
                "empty"
            )

    def data_sets(self) -> list[tuple[str, str, str]]:
        """(role, config key, directory) of every prepared data set the run reads: "train"
        (data.dir), "replay" (finetune.replay_dir, if set), or instead of both
        "mixture/<name>" for each source of data.mixture, and "extra_val/<name>" for each
        data.extra_val set, a role no other set can take."""
        if self.data.mixture:
            sets = [
                (f"mixture/{name}", f"data.sources.{name}", self.data.sources.get(name, ""))
                for name in self.data.mixture
            ]
        else:
            sets = [("train", "data.dir", self.data.dir)]
        if self.finetune.replay_dir:
            sets.append(("replay", "finetune.replay_dir", self.finetune.replay_dir))
        for name, directory in self.data.extra_val.items():
            sets.append((f"extra_val/{name}", f"data.extra_val.{name}", directory))
        return sets


RESERVED_VAL_NAMES = ("train", "val", "replay")
MIXTURE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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
}
# [bench] once switched train.py into a benchmark mode (`--bench.steps=N`), now the script
# bench/trainer.py. Every config.toml saved before holds the table with steps = 0 (train), so
# in a file it is read and dropped (old runs still resume and report); asking for the
# benchmark (steps > 0, or any --bench.* on the command line) is refused by `retired_setting`.
RETIRED_SECTIONS = {"bench": ("steps", "warmup", "backends", "compile")}


def retired_setting(section: str, key: str, value: Any, origin: str) -> None:
    """Accept ``section.key = value`` of a retired section (``RETIRED_SECTIONS``) from a
    config file where it asks for nothing (ignored); otherwise a ConfigError naming the key
    and what to do instead."""
    run = "python bench/trainer.py CONFIG --steps N [--warmup N] [--backends ...] [--compile ...]"
    what = (
        f"[{section}] is retired: train.py has no benchmark mode any more; its settings are "
        f"flags of `{run}` (docs/performance.md)"
    )
    if origin == "command line":
        raise ConfigError(f"command line: --{section}.{key}: {what}")
    if key not in RETIRED_SECTIONS[section]:
        raise ConfigError(f"{origin}: unknown key {section}.{key}; {what}")
    if key == "steps" and not (type(value) is int and value == 0):  # 0: written by train.py
        raise ConfigError(
            f"{origin}: {section}.{key} = {value!r}: {what}. Delete the [{section}] table "
            f"from {origin} (and pass --steps to bench/trainer.py to time the trainer)"
        )
