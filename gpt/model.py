"""A decoder-only GPT, GPT-2 by default (Radford et al. 2019).

Defaults reproduce GPT-2 exactly: token + learned position embeddings, pre-LayerNorm blocks,
causal multi-head self-attention, a 4x MLP with tanh-approximated GELU, a final LayerNorm and
an LM head tied to the token embedding. Switches in ``ModelConfig`` swap in the variants the
Transformer literature compares: post-norm (Vaswani et al. 2017), sinusoidal positions
(Vaswani et al. 2017), rotary positions (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019),
SwiGLU (Shazeer 2020) and grouped-query attention (Ainslie et al. 2023).

Parameter names follow Hugging Face's GPT-2 (``transformer.h.N.attn.c_attn`` ...) so that
weight conversion in ``gpt/convert/gpt2.py`` is a rename plus a transpose; ``llama.py`` beside
it maps the Llama switches. The LM head may be untied, and its rows (with the embedding's)
padded to a fast matmul shape: logits and loss cover the real vocabulary only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gpt.attention import get_attention
from gpt.config import ModelConfig
from gpt.loss import chunked_cross_entropy
from gpt.rope import resolve_scaling, rope_tables
from gpt.sdpa import sdpa_order, sdpa_priority

Rope = tuple[Tensor, Tensor]  # cos, sin of the rotary angles of the positions in x, (T, D/2)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """Fixed positions of "Attention Is All You Need": PE[p, 2i] = sin(p / 10000^(2i/dim)),
    PE[p, 2i+1] = cos(same). Returns (length, dim) float32."""
    f64 = dict(dtype=torch.float64, device="cpu")  # real tensors even under a meta device
    pos = torch.arange(length, **f64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, **f64) / dim)
    table = torch.zeros(length, dim, **f64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by position-dependent angles (the GPT-NeoX /
    LLaMA "rotate half" layout). x: (B, H, T, D); cos, sin: (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class MaskPadding(torch.autograd.Function):
    """Logits of the padding columns (index >= V) set to -inf, in place: they get no
    probability mass, so the loss is that of the real vocabulary. The gradient passes
    through unchanged: at those columns it is exactly zero already (softmax(-inf) = 0, and
    no target is a padding id), so autograd's own in-place slice assignment (CopySlices)
    would only add a full-size copy of the logits' gradient to every backward pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, V: int) -> Tensor:
        logits[..., V:] = float("-inf")
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class KVCache:
    """Keys and values of the positions seen so far, for decoding without recomputation.

    One (B, H_kv, S_max, D) buffer each for keys and values per layer (S_max = the model's
    ``max_positions``: past block_size with model.rope_scaling), filled from position 0;
    ``length`` counts the filled positions and is advanced by ``GPT.forward``. Positions of new
    tokens are offset by ``length`` and the T new tokens attend causally to the cached ones and
    to each other (the bottom-right aligned mask of gpt/attention.py), so any split of a
    sequence into chunks (a prefill, single tokens, a chunked prompt, a shared prefix followed
    by several continuations) gives the logits of one full recomputation."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.kv_heads, cfg.max_positions, cfg.n_embd // cfg.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, D) after the cached positions; return every key and value
        of this layer so far, (B, H_kv, length + T, D)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def expand(self, batch_size: int) -> KVCache:
        """A new cache of ``batch_size`` rows, each a copy of this one-row cache's positions:
        a prefix computed once, continued by several sequences (e.g. the choices of a
        multiple-choice question)."""
        if self.keys[0].shape[0] != 1:
            raise ValueError(f"expand copies a one-row cache, this one has {self.keys[0].shape[0]}")
        new = KVCache.__new__(KVCache)
        new.keys = [k.expand(batch_size, -1, -1, -1).clone() for k in self.keys]
        new.values = [v.expand(batch_size, -1, -1, -1).clone() for v in self.values]
        new.length = self.length
        return new


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.n_embd // cfg.n_head
        # one fused projection for q, k, v (Hugging Face's c_attn); with GQA k and v are narrower
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attend = get_attention(cfg.attention)

    def forward(
        self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        B, T, C = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H_kv, S, D), S = cached + T
        # new tokens see the cached keys and the new ones up to themselves (bottom-right
        # aligned when S > T); a single token sees every key, which needs no mask at all
        causal = T > 1
        y = self.attend(q, k, v, causal, 1.0 / math.sqrt(self.head_dim))  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its name in the block:
    what bounds a LoRA rank (gpt/lora.py) and what the memory estimate counts
    (gpt/memory.py), known without building the model."""
    head_dim, hidden = cfg.n_embd // cfg.n_head, cfg.mlp_hidden
    return {
        "attn.c_attn": (cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * head_dim),
        "attn.c_proj": (cfg.n_embd, cfg.n_embd),
        "mlp.c_fc": (cfg.n_embd, 2 * hidden if cfg.mlp == "swiglu" else hidden),
        "mlp.c_proj": (hidden, cfg.n_embd),
    }


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.mlp_hidden
        # SwiGLU's c_fc produces the gate and the value side by side: (.., 2 * hidden)
        self.c_fc = nn.Linear(
            cfg.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias
        )
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(
        self, x: Tensor, rope: Rope | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        if self.pre_norm:  # x + f(norm(x)): GPT-2
            x = x + self.attn(self.ln_1(x), rope, cache, layer)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, rope, cache, layer))  # norm(x + f(x)): the Transformer
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        rows = cfg.padded_vocab_size  # >= vocab_size; rows past vocab_size are never used
        t = nn.ModuleDict(
            {
                "wte": nn.Embedding(rows, cfg.n_embd),
                "drop": nn.Dropout(cfg.dropout),
                "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                # post-norm blocks already end in a norm, so only pre-norm needs a final one
                "ln_f": make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity(),
            }
        )
        if cfg.position_encoding == "learned":
            t["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = t
        self.lm_head = nn.Linear(cfg.n_embd, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = t.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        # fixed tables are buffers, not parameters, and are not saved (persistent=False)
        if cfg.position_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), False)
        if cfg.position_encoding == "rope":  # scaled tables (gpt/rope.py) over max_positions
            head_dim = cfg.n_embd // cfg.n_head
            cos, sin = rope_tables(cfg.max_positions, head_dim, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, False)
            self.register_buffer("rope_sin", sin, False)
        # which kernel F.scaled_dot_product_attention may pick, in order (gpt/sdpa.py); an
        # empty model.sdpa_kernels is resolved for the device current at build time
        self.sdpa_order = sdpa_order(cfg.sdpa_kernels)
        # train.activation_checkpointing, set by the trainer (gpt/train/finetune.py): how a
        # run trains, not what the model is, so an attribute that no exported config holds
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        with torch.no_grad():  # padding rows: no token reads them, no logit comes from them
            t.wte.weight[cfg.vocab_size :].zero_()
            self.lm_head.weight[cfg.vocab_size :].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied LM head is the token embedding), of the real
        vocabulary only: padding rows (``vocab_multiple``) are storage that no token or
        logit uses, so a padded model counts (and its MFU credits) what the unpadded one
        does. With ``non_embedding`` the position embedding is left out, as in Kaplan et
        al. 2020."""
        # under ZeRO-3 a parameter is an empty placeholder: its whole size is ds_numel
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        padding = (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.n_embd
        n -= padding * (1 if self.cfg.tie_embeddings else 2)
        if non_embedding and "wpe" in self.transformer:
            wpe = self.transformer.wpe.weight
            n -= getattr(wpe, "ds_numel", wpe.numel())
        return n

    def set_attention(self, name: str) -> None:
        """Switch every layer to backend ``name``; weights are untouched."""
        attend = get_attention(name)
        for block in self.transformer.h:
            block.attn.attend = attend
        self.cfg.attention = name

    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean
        cross-entropy over the positions whose target is not -1 (with ``model.loss_chunk``
        set, the loss alone: logits None, never materialised). With ``kv_cache`` the tokens
        continue the cached ones (positions start at ``kv_cache.length``) and are appended to
        it, any number at a time."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.cfg.max_positions:
            longest = f"block_size {self.cfg.block_size}"
            if self.cfg.max_positions > self.cfg.block_size:
                longest = f"the {self.cfg.max_positions} positions of model.rope_scaling"
            raise ValueError(f"sequence length {start + T} exceeds {longest}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.position_encoding == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.cfg.position_encoding == "sinusoidal":
            x = x + self.pos_table[start : start + T].to(x.dtype)
        else:
            rope = self.rope_rows(start, start + T)
        x = self.transformer.drop(x)
        # activation checkpointing (Chen et al. 2016): a block keeps only its input for the
        # backward pass, which runs the block again; never while decoding (the recompute
        # would append to the cache twice) nor in evaluation (nothing is kept for a backward)
        recompute = self.activation_checkpointing and self.training and kv_cache is None
        with sdpa_priority(self.sdpa_order):
            for i, block in enumerate(self.transformer.h):
                if recompute and torch.is_grad_enabled():
                    # preserve_rng_state: the recompute draws the forward's dropout masks
                    args = (self._recompute_block, block, x, rope, i)
                    x = checkpoint(*args, use_reentrant=False, preserve_rng_state=True)
                else:
                    x = block(x, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x, V = self.transformer.ln_f(x), self.cfg.vocab_size
        if targets is not None and self.cfg.loss_chunk:
            flat = x.reshape(B * T, -1)  # (B*T, C)
            w, chunk = self.lm_head.weight, self.cfg.loss_chunk
            return None, chunked_cross_entropy(flat, w, targets.reshape(-1), V, chunk)
        logits = self.lm_head(x)  # (B, T, padded vocab)
        if targets is None:
            return logits[..., :V]  # a view: the padding columns are never seen
        if logits.size(-1) > V:
            logits = MaskPadding.apply(logits, V)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, float64 in tests
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).to(acc), targets.reshape(-1), ignore_index=-1
        )
        return logits[..., :V], loss

    def _recompute_block(self, block: Block, x: Tensor, rope: Rope | None, i: int) -> Tensor:
        # the backward pass runs this again outside forward's sdpa_priority: the recompute
        # must pick the forward's SDPA kernel, whose saved tensors it replaces
        with sdpa_priority(self.sdpa_order):
            return block(x, rope, None, i)

    def rope_rows(self, start: int, end: int) -> Rope:
        """cos, sin (end - start, D/2) of positions [start, end) of a sequence of ``end``
        positions. The static types read the tables built once; ``dynamic`` past its original
        length recomputes them for a base that grows with ``end``, as transformers does: a
        cached token keeps the rotation it was computed with (docs/long-context.md)."""
        cfg, scaling = self.cfg, resolve_scaling(self.cfg.rope_scaling)
        if scaling.get("type") != "dynamic" or end <= scaling["original_max_position_embeddings"]:
            return self.rope_cos[start:end], self.rope_sin[start:end]
        head_dim = cfg.n_embd // cfg.n_head
        cos, sin = rope_tables(end - start, head_dim, cfg.rope_theta, scaling, start, end)
        return cos.to(self.rope_cos), sin.to(self.rope_sin)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> GPT:
        """Load a model directory: one written by ``save_pretrained``, or a Hugging Face GPT-2
        or Llama checkpoint. ``overrides`` replace ModelConfig fields that keep the weights'
        shapes (e.g. attention="naive", dropout=0.1) or pad them (vocab_multiple=64)."""
        from gpt.convert import WEIGHTS, read_model_dir

        cfg, state, _ = read_model_dir(path)
        cfg = dataclasses.replace(cfg, **overrides)
        with torch.device("meta"):  # no time spent initialising weights that are overwritten
            model = cls(cfg)
        model.load_weights(state, Path(path) / WEIGHTS)
        return model

    def load_weights(self, state: dict[str, Tensor], source: str | Path) -> None:
        """Take every parameter from ``state`` (our names); ValueError naming ``source`` if a
        name or a shape does not match. A tied model's ``lm_head.weight`` may be left out;
        embedding rows of the real vocabulary only are padded with zeros. Works on a model
        built on the meta device."""
        cfg, wte, head = self.cfg, "transformer.wte.weight", "lm_head.weight"
        state = dict(state)
        if cfg.tie_embeddings and head in state and wte in state:
            if not torch.equal(state.pop(head), state[wte]):
                raise ValueError(
                    f"{source}: lm_head.weight differs from transformer.wte.weight but the "
                    "config ties them (tie_embeddings = true)"
                )
        for name in (wte, head):  # exports hold the real vocabulary; padding rows are unread
            if name in state and state[name].shape[0] == cfg.vocab_size < cfg.padded_vocab_size:
                pad = cfg.padded_vocab_size - cfg.vocab_size
                state[name] = F.pad(state[name], (0, 0, 0, pad))
        expected = dict(self.state_dict())
        if cfg.tie_embeddings:
            expected.pop(head)  # the same tensor as wte
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not match the config: "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, the config needs "
                    f"{tuple(expected[name].shape)}"
                )
        self.load_state_dict(state, strict=False, assign=True)  # every name checked above
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # assign=True broke the tie

    def save_pretrained(
        self, path: str | Path, tokenizer: str | None = None, architecture: str = "auto"
    ) -> str:
        """Write ``config.json`` + ``model.safetensors`` (the real vocabulary's rows only).
        ``architecture``: "auto" (GPT-2 or Llama when the switches allow, else our
        own), "transformers" (GPT-2 or Llama, else ValueError naming the switches), "gpt2",
        "llama" or "gpt" (ours). ``tokenizer`` (an encoding name) is recorded, and gives
        the exported end-of-text id. Returns the architecture written: "gpt2", "llama" or "gpt"."""
        from gpt.convert import write_model_dir

        return write_model_dir(path, self.cfg, self.state_dict(), tokenizer, architecture)
