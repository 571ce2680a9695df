"""Memory estimates, checked before a model is built or a batch allocated: a configuration
that cannot fit is refused in one line saying what would fit, instead of a minutes-long build
or an allocator's traceback.

Training, bytes per process (P stored parameter elements, padding rows and LoRA adapters
included, a tied head counted once; P_t the trainable ones; N processes; w = 2 where the
weights are 16-bit (train.dtype = "fp16", or bf16 with deepspeed.bf16.enabled), else 4):

    weights      w P                                  divided by N at ZeRO stage 3
    gradients    w P_t                                divided by N at ZeRO stage 2 and 3
    optimizer    8 P_t (Adam's two fp32 moments)
                 + 4 P_t (DeepSpeed's fp32 master copy: 16-bit weights or ZeRO 1-3)
                                                      divided by N at ZeRO stage 1-3
    buffers      ZeRO 1-3: DeepSpeed's reduce bucket, 4 min(reduce_bucket_size, P_t)
                 (twice with overlap_comm); ZeRO 3 also one block and the embedding
                 gathered whole, w (block + V' C); ZeRO 0 with N > 1: one gradient bucket
                 flattened for the all-reduce, w min(5e8, P_t); bf16 autocast: its bf16
                 copies of the weights, 2 P
    activations  B T [L k_b + max(C (r + a) + 4 k V', b + 4 V')]

with B = train.micro_batch_size, T = model.block_size, L layers of width C, H heads, C_kv =
n_kv_head x head size, V' the padded vocabulary, r and a the bytes of the residual stream and
of the matmul inputs (4 and 4 in fp32; 4 and 2 under bf16 autocast; 2 and 2 with 16-bit
weights). What a block keeps for its backward pass, per token, k_b = l: the two norm inputs
(2 C r); the inputs of the four projections, the q, k, v and attention outputs (5 C + 2 C_kv);
the MLP's m = 2 h (GELU: its input and output), h (ReLU) or 4 h (SwiGLU) of hidden width h;
p = C + C_kv with rotary positions (the rotated q and k); the attention's log-sum-exp (4 H
bytes); d = 2 C bytes of dropout masks when dropout > 0; n = 4 H T bytes with the naive
backend (the softmax it materialises):

    l = 2 C r + (5 C + 2 C_kv + m + p) a + 4 H + d + n

That is the count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models": 34 s b h bytes per layer in 16 bits) for our layers. With
train.activation_checkpointing a block keeps its input alone, k_b = C r, and runs again in the
backward pass. Beside what the blocks keep, the backward pass peaks either at its start, over
the head (the final norm's and head's inputs, and k = 4 fp32 copies of the logits: the
logits, which the caller holds until backward, their log-softmax and the two gradients; the
largest term of a small model with GPT-2's vocabulary), or inside a block: b = the block's
gradients, max(2 C r + m a, 8 H T with the naive backend: two score matrices), plus l for
the block run again with checkpointing, beside the caller's logits (4 V'). With
model.loss_chunk = n (gpt/loss.py) the logits are never held in full: 4 bytes per token (the
log-sum-exp) for the logit copies and the caller's logits, plus, over the head, one chunk's
logits and softmax gradient, n V' 2 (4 + a), and the head's fp32 gradient sum, 4 V' C. The
other parts are summed with the activations, although a step's activations are freed before
the optimizer's buffers are used. Left out: the allocator's fragmentation and cache (on the
CPU glibc's malloc, whose mmap threshold rises as large blocks are freed, keeps freed pages
in its heap: a checkpointed run's resident memory can be several times its tensors'), the
CUDA context, torch.compile's savings (its fused kernels keep less).
tests/test_memory.py holds the estimate within 25% of the measured peak of DeepSpeed training
steps on the CPU (glibc's mmap threshold held fixed): 0.99-1.17 of it across the model's
switches, ZeRO stages, T up to 1024 and activation checkpointing; and a block's term within
10% of the tensors autograd saves.

Decoding (sample.py), bytes per sequence of the batch, beside the weights already loaded:
the KV cache 2 L C_kv S e (S = max_positions: block_size, or the longer context of
model.rope_scaling; e bytes per weight), the token buffer 8 (T_p + n_new), the prefill's
logits 4 T_p V' (every prompt position is projected) and its largest activations
T_p (4 C + 2 h) e + 4 H T_p^2 (attention scores, when materialised), and the sampling
step's 4 copies of one row of logits, 16 V'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from gpt.config import Config, ConfigError, ModelConfig
from gpt.model import linear_shapes

GiB = 1 << 30
LOGIT_COPIES = 4  # the logits (the caller holds them), their log-softmax, and both gradients
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements


@dataclass
class MemoryEstimate:
    """Bytes per process, by part (weights, gradients, ...); ``total`` sums them."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def summary(self) -> str:
        """E.g. "1.9 GiB (weights 120 MiB, gradients 120 MiB, ... activations 1.4 GiB)"."""
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _norm_params(m: ModelConfig) -> int:
    return m.n_embd * (2 if m.norm == "layernorm" and m.bias else 1)


def _block_params(m: ModelConfig) -> int:
    linears = sum(i * o + (o if m.bias else 0) for i, o in linear_shapes(m).values())
    return linears + 2 * _norm_params(m)


def param_counts(cfg: Config) -> tuple[int, int]:
    """(stored, trainable) parameter elements of the model a run of ``cfg`` trains, without
    building it: every tensor once (a tied head is the embedding), the rows ``vocab_multiple``
    pads with and LoRA adapters included; trainable as ``[finetune]`` leaves it
    (``gpt.train.finetune.build_model``: LoRA freezes every base weight, and freezing a block
    freezes its adapters too)."""
    m, f = cfg.model, cfg.finetune
    shapes = linear_shapes(m)
    learned = m.position_encoding == "learned"
    embeddings = m.padded_vocab_size * m.n_embd + (m.block_size * m.n_embd if learned else 0)
    head = 0 if m.tie_embeddings else m.padded_vocab_size * m.n_embd
    final_norm = _norm_params(m) if m.norm_position == "pre" else 0
    targets = set(f.lora_targets) if f.lora_rank else set()
    adapters = sum(f.lora_rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    stored = embeddings + head + final_norm + m.n_layer * (_block_params(m) + adapters)
    if cfg.train.init_from == "scratch":
        return stored, stored
    frozen = min(f.freeze_blocks, m.n_layer)
    if f.lora_rank:
        return stored, (m.n_layer - frozen) * adapters
    trainable = stored - frozen * _block_params(m)
    return stored, trainable - (embeddings if f.freeze_embeddings else 0)


def precision(cfg: Config) -> str:
    """How training holds its weights (``gpt.train.engine.precision``: DeepSpeed's config is
    the engine's), imported on use so that decoding's estimates never load the trainer."""
    from gpt.train.engine import precision

    return precision(cfg)


def _weight_bytes(cfg: Config) -> int:
    return 2 if precision(cfg) in ("deepspeed-bf16", "fp16") else 4


def activation_bytes(cfg: Config, micro_batch_size: int) -> int:
    """What one micro-batch's forward pass keeps for the backward pass, and the backward
    pass's own peak (module docstring)."""
    m = cfg.model
    C, H, T = m.n_embd, m.n_head, m.block_size
    kv = m.kv_heads * (C // H)
    r = _weight_bytes(cfg)
    a = 4 if cfg.train.dtype == "fp32" else 2
    mlp = {"gelu": 2, "relu": 1, "swiglu": 4}[m.mlp] * m.mlp_hidden
    rope = C + kv if m.position_encoding == "rope" else 0
    layer = 2 * C * r + (5 * C + 2 * kv + mlp + rope) * a + 4 * H
    layer += 2 * C if m.dropout > 0 else 0
    layer += 4 * H * T if m.attention == "naive" else 0
    # kept through the backward pass: every block's saved tensors, or with
    # train.activation_checkpointing each block's input alone
    V, tokens = m.padded_vocab_size, micro_batch_size * T
    recompute = cfg.train.activation_checkpointing
    kept = m.n_layer * (C * r if recompute else layer)
    # beside them the backward pass peaks either over the head (the final norm's and the
    # head's inputs, the logits' copies; with model.loss_chunk each token's log-sum-exp, one
    # chunk's logits and the head's fp32 gradient sum, gpt/loss.py) or in a block (the
    # block run again; the gradients of its MLP and residual stream, or with the naive
    # backend two score matrices' (the softmax's and its input's); the caller's logits)
    head = tokens * (C * (r + a) + (4 if m.loss_chunk else 4 * LOGIT_COPIES * V))
    if m.loss_chunk:
        head += min(m.loss_chunk, tokens) * V * 2 * (4 + a) + 4 * V * C
    gradients = max(2 * C * r + mlp * a, 8 * H * T if m.attention == "naive" else 0)
    block = (layer if recompute else 0) + gradients + (4 if m.loss_chunk else 4 * V)
    return tokens * kept + max(head, tokens * block)


def training_memory(cfg: Config, world: int, micro_batch_size: int | None = None) -> MemoryEstimate:
    """The estimate for one training process of ``cfg`` among ``world`` (module docstring),
    at ``micro_batch_size`` (default train.micro_batch_size)."""
    stored, trainable = param_counts(cfg)
    m, w, stage = cfg.model, _weight_bytes(cfg), cfg.zero_stage
    zero = cfg.deepspeed.get("zero_optimization", {})
    buffers = 2 * stored if precision(cfg) == "autocast" else 0  # autocast's bf16 weights
    if stage >= 1:  # DeepSpeed's reduce bucket(s)
        bucket = min(int(zero.get("reduce_bucket_size", DEEPSPEED_BUCKET)), trainable)
        buffers += 4 * bucket * (2 if zero.get("overlap_comm", stage == 3) else 1)
    if stage == 3:  # one block and the embedding gathered whole at a time
        buffers += w * (_block_params(m) + m.padded_vocab_size * m.n_embd)
    elif stage == 0 and world > 1:  # one bucket of gradients flattened for the all-reduce
        buffers += w * min(DEEPSPEED_BUCKET, trainable)
    master = 4 if w == 2 or stage >= 1 else 0
    parts = {
        "weights": w * stored // (world if stage == 3 else 1),
        "gradients": w * trainable // (world if stage >= 2 else 1),
        "optimizer": (8 + master) * trainable // (world if stage >= 1 else 1),
        "buffers": buffers,
        "activations": activation_bytes(cfg, micro_batch_size or cfg.train.micro_batch_size),
    }
    return MemoryEstimate(parts)


def available_memory(device: torch.device | str | None = None) -> tuple[int, str]:
    """(bytes, where) this process may still allocate on ``device`` (default: the GPU when
    there is one, as the trainer uses, else the CPU). A GPU's free memory; on the CPU the
    memory the system has available, shared by the processes a launcher started on this node
    (LOCAL_WORLD_SIZE)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"free on cuda:{index}"
    import psutil  # a DeepSpeed dependency

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = f" (1/{local} for each of {local} processes)" if local > 1 else ""
    return psutil.virtual_memory().available // local, f"available on the CPU{share}"


def check_training_memory(
    cfg: Config, world: int, available: tuple[int, str] | None = None
) -> MemoryEstimate:
    """The estimate; ConfigError saying what fits when it exceeds ``available`` (bytes,
    where; default ``available_memory()``)."""
    estimate = training_memory(cfg, world)
    free, where = available or available_memory()
    if estimate.total <= free:
        return estimate
    m, t = cfg.model, cfg.train
    fixed = estimate.total - estimate.parts["activations"]
    per_sequence = activation_bytes(cfg, 1)
    if fixed + per_sequence > free:
        stored, _ = param_counts(cfg)
        fits = int(stored * free / max(1, fixed + per_sequence))
        raise ConfigError(
            f"model (n_layer = {m.n_layer}, n_embd = {m.n_embd}, vocab_size = {m.vocab_size}): "
            f"{stored:,} parameters need about {format_bytes(fixed)} per process for weights, "
            f"gradients and optimizer state, {format_bytes(fixed + per_sequence)} with one "
            f"sequence of {m.block_size} tokens, but {format_bytes(free)} is {where}; about "
            f"{fits:,} parameters fit here (at ZeRO stage {cfg.zero_stage}, {world} "
            "process(es); ZeRO stage 3 divides weights, gradients and optimizer state by the "
            "number of processes)"
        )
    largest = (free - fixed) // per_sequence
    raise ConfigError(
        f"train.micro_batch_size = {t.micro_batch_size} (x model.block_size = {m.block_size} "
        f"tokens): a step needs about {estimate.summary()} per process, but "
        f"{format_bytes(free)} is {where}; the largest micro_batch_size that fits is {largest} "
        "(raise train.grad_accum to keep the global batch)"
    )


def decode_memory(
    m: ModelConfig, batch: int, prompt_tokens: int, new_tokens: int, weight_bytes: int = 4
) -> MemoryEstimate:
    """What decoding ``batch`` sequences allocates beside the weights (module docstring)."""
    C, H, T = m.n_embd, m.n_head, max(1, min(prompt_tokens, m.max_positions))
    kv = m.kv_heads * (C // H)
    scores = 4 * H * T * T if m.attention == "naive" else 0
    parts = {
        "KV cache": 2 * m.n_layer * kv * m.max_positions * weight_bytes,
        "tokens": 8 * (prompt_tokens + new_tokens),
        "logits": 4 * T * m.padded_vocab_size + 16 * m.padded_vocab_size,
        "activations": T * (4 * C + 2 * m.mlp_hidden) * weight_bytes + scores,
    }
    return MemoryEstimate({k: batch * v for k, v in parts.items()})


def check_decode_memory(
    m: ModelConfig,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    weight_bytes: int = 4,
    available: tuple[int, str] | None = None,
    flag: str = "--num-samples",
) -> MemoryEstimate:
    """The decoding estimate; ValueError naming ``flag`` and the largest batch that fits
    when it exceeds ``available`` (default ``available_memory()``, of the default device)."""
    estimate = decode_memory(m, batch, prompt_tokens, new_tokens, weight_bytes)
    free, where = available or available_memory()
    if estimate.total <= free:
        return estimate
    one = decode_memory(m, 1, prompt_tokens, new_tokens, weight_bytes).total
    largest = free // one
    fits = f"at most {largest} fit" if largest else "not even one sequence fits"
    raise ValueError(
        f"{flag} {batch} with {prompt_tokens} prompt and {new_tokens} new tokens needs about "
        f"{estimate.summary()}, but {format_bytes(free)} is {where}: {fits}"
    )
