"""Autoregressive decoding with a KV cache, and the sampling filters.

Decoding feeds the prompt through the model once (the prefill, which fills ``KVCache``) and
then one new token at a time, reusing the keys and values of every earlier position: each
step costs one token's forward pass instead of the whole context's. The logits equal those
of nanoGPT's method, which recomputes the full context at every step (``use_cache=False``).

Past ``block_size`` the window slides (past ``max_positions``, the longer context of
``model.rope_scaling``, which stands for block_size in this paragraph). Cached keys depend on
the positions (and the context) they were computed with, so a full cache is rebuilt by a
prefill of the window's last ``window_keep`` tokens. The default, ``block_size``, is
nanoGPT's crop exactly: the model always sees the last ``block_size`` tokens, and the cache
is rebuilt for every new token, so decoding past ``block_size`` runs at the speed of full
recomputation. A smaller
``window_keep`` (e.g. ``block_size // 2``) rebuilds once every ``block_size - window_keep + 1``
tokens, and the model then sees between ``window_keep`` and ``block_size`` tokens.

Sampling: temperature (0 means greedy, argmax), top-k (Fan et al. 2018: keep the k most
likely tokens) and top-p / nucleus sampling (Holtzman et al. 2020: keep the smallest set of
most likely tokens whose probability mass reaches p). A seeded ``torch.Generator`` makes
samples reproducible: same seed, same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.model import GPT, KVCache, apply_rope


def encode_prompt(tokenizer, text: str, block_size: int) -> tuple[list[int], str | None]:
    """Token ids of a prompt and a warning if it was cut. An empty prompt starts from the
    end-of-text token; one longer than the context keeps its last block_size - 1 tokens
    (room for one new token before the window slides)."""
    ids = tokenizer.encode(text) or [tokenizer.eot]
    if len(ids) <= block_size - 1:
        return ids, None
    keep = max(1, block_size - 1)
    warning = (
        f"the prompt has {len(ids)} tokens, more than block_size - 1 = {block_size - 1}; "
        f"keeping its last {keep}"
    )
    return ids[-keep:], warning


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the flag when a sampling setting is out of range."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0 means greedy), got {temperature}"
        )
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"--top-k must be an integer >= 1 (or unset: no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 keeps every token), got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits (..., V) with every token below the k-th largest set to -inf. Tokens tied with
    the k-th largest are kept, so more than k may survive a tie."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Logits (..., V) keeping the smallest set of most likely tokens whose probabilities sum
    to at least p (always at least the most likely one); the rest set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose one token per row of logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted by top-k, then top-p. Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeStep:
    """One new token per sequence through ``model``, for decoding: ``step(token)`` returns
    the next-token logits and advances the position (call ``start()`` after a prefill).

    The position is a (1,) tensor advanced in place and keys and values are written into the
    (B, H_kv, block_size, D) buffers of ``cache`` with ``index_copy_``: nothing is allocated
    or concatenated per token. Eager, attention is the model's backend on the filled
    positions (a decode kernel sees the real key length). ``static`` (implied by ``compile``)
    makes every shape constant instead: attention reads the whole buffer under a mask of the
    filled positions (PyTorch's sdpa), so that the step compiles once (``torch.compile``; on a
    GPU with CUDA graphs, "reduce-overhead"). The arithmetic is the model's (eval mode: no
    dropout) and is tested against its forward."""

    def __init__(self, model: GPT, cache: KVCache, static: bool = False, compile: bool = False):
        self.model, self.cache, self.static = model, cache, static or compile
        device = cache.keys[0].device
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the new token's position
        self.slots = torch.arange(model.cfg.max_positions, device=device)  # cache positions
        if self.static and model.cfg.rope_scaling.get("type") == "dynamic":
            raise ValueError(
                "model.rope_scaling type 'dynamic' recomputes the rotary tables for every new "
                "length, which a static (compiled) decode step cannot; decode without compile"
            )
        self.run = self.forward
        if compile:
            mode = None
            if device.type == "cuda":  # CUDA graphs: buffers updated in place at fixed addresses
                mode = "reduce-overhead"
                for t in [self.pos, *cache.keys, *cache.values]:
                    torch._dynamo.mark_static_address(t)
            self.run = torch.compile(self.forward, fullgraph=True, dynamic=False, mode=mode)

    def start(self) -> None:
        """Continue after the cache's filled positions (e.g. after a prefill)."""
        self.pos.fill_(self.cache.length)

    def step(self, token: Tensor) -> Tensor:
        """token (B, 1) -> next-token logits (B, vocab); the token joins the cache."""
        logits = self.run(token)
        self.pos += 1
        self.cache.length += 1
        return logits

    def forward(self, token: Tensor) -> Tensor:
        """token (B, 1) at position ``self.pos`` -> next-token logits (B, vocab)."""
        m, cfg, pos = self.model, self.model.cfg, self.pos
        t = m.transformer
        x = t.wte(token)  # (B, 1, C)
        rope = None
        if cfg.position_encoding == "learned":
            x = x + t.wpe(pos)
        elif cfg.position_encoding == "sinusoidal":
            x = x + m.pos_table[pos].to(x.dtype)
        elif self.static:
            rope = (m.rope_cos[pos], m.rope_sin[pos])  # (1, D/2) each
        else:  # by the cache's length: dynamic scaling depends on it (GPT.rope_rows)
            rope = m.rope_rows(self.cache.length, self.cache.length + 1)
        visible = (self.slots <= pos).view(1, 1, 1, -1) if self.static else None  # (1, 1, 1, S)
        for i, block in enumerate(t.h):
            attn = block.attn
            h = block.ln_1(x) if block.pre_norm else x
            B, H, H_kv, D = x.shape[0], attn.n_head, attn.n_kv_head, attn.head_dim
            q, k, v = attn.c_attn(h).split([H * D, H_kv * D, H_kv * D], dim=2)
            q = q.view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
            k = k.view(B, 1, H_kv, D).transpose(1, 2)  # (B, H_kv, 1, D)
            v = v.view(B, 1, H_kv, D).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            keys, values = self.cache.keys[i], self.cache.values[i]  # (B, H_kv, S, D)
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            if self.static:
                y = F.scaled_dot_product_attention(
                    q, keys, values, visible, scale=1.0 / math.sqrt(D), enable_gqa=H != H_kv
                )  # (B, H, 1, D)
            else:  # one query sees every filled key: no mask
                end = self.cache.length + 1
                y = attn.attend(q, keys[:, :, :end], values[:, :, :end], False, 1 / math.sqrt(D))
            y = attn.c_proj(y.transpose(1, 2).reshape(B, 1, H * D))
            if block.pre_norm:
                x = x + y
                x = x + block.mlp(block.ln_2(x))
            else:
                x = block.ln_1(x + y)
                x = block.ln_2(x + block.mlp(x))
        return m.lm_head(t.ln_f(x))[:, -1]  # (B, vocab)


def decode_step(model: GPT, batch_size: int, compile: bool = False) -> DecodeStep:
    """A ``DecodeStep`` for this batch size, with its cache. A compiled one is kept on the
    model (per batch size, dtype and device), so that it is compiled once and reused by later
    calls; an eager one is made afresh, so that its cache is freed after decoding."""
    param = next(model.parameters())
    if not compile:
        cache = KVCache(model.cfg, batch_size, device=param.device, dtype=param.dtype)
        return DecodeStep(model, cache)
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    key = (batch_size, param.dtype, param.device)
    if key not in steps:
        cache = KVCache(model.cfg, batch_size, device=param.device, dtype=param.dtype)
        steps[key] = DecodeStep(model, cache, compile=True)
    return steps[key]


@torch.no_grad()
def decode(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    window_keep: int | None = None,
    vocab_size: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of each sequence of ``idx`` (B, T), a (B,) tensor per step, for
    ``max_new_tokens`` steps. Put the model in eval mode first (dropout would randomise it).
    ``use_cache=False`` recomputes the whole window at every step (nanoGPT's method);
    ``window_keep`` is the context kept when a full cache is rebuilt (module docstring).
    Tokens are drawn from the first ``vocab_size`` ids only (default: all): a vocabulary
    padded past the tokenizer's has ids nothing can decode. ``compile`` compiles the
    single-token step (worth it for long or repeated decoding: compiling takes seconds)."""
    check_sampling(temperature, top_k, top_p)
    block = model.cfg.max_positions
    keep = block if window_keep is None else window_keep
    if not 1 <= keep <= block:
        what = "block_size" if block == model.cfg.block_size else "model.rope_scaling's context"
        raise ValueError(f"--window-keep must be in [1, {what} = {block}], got {keep}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    if max_new_tokens <= 0:
        return
    B, T = idx.shape
    # every token so far, written in place (no concatenation per step)
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    tokens[:, :T] = idx
    n = T  # tokens so far
    if use_cache:
        if isinstance(model, GPT):
            step = decode_step(model, B, compile)
            cache = step.cache
        else:  # a stand-in model (tests): its own forward, one token at a time
            step, cache = None, KVCache(model.cfg, B, device=idx.device)
        cache.length = 0
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(tokens[:, max(0, n - block) : n])[:, -1]
        elif cache.length == 0 or cache.length == block:  # prefill; past block_size, rebuild
            start = max(0, n - block) if cache.length == 0 else n - keep
            cache.length = 0
            logits = model(tokens[:, start:n], kv_cache=cache)[:, -1]
            if step is not None:
                step.start()
        elif step is None:
            logits = model(tokens[:, n - 1 : n], kv_cache=cache)[:, -1]
        else:
            logits = step.step(tokens[:, n - 1 : n])
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits[:, :vocab_size]
        token = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        tokens[:, n] = token
        n += 1
        yield token


def generate(model: GPT, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """``idx`` (B, T) followed by ``max_new_tokens`` new tokens, (B, T + max_new_tokens);
    keyword arguments as for ``decode``. The model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        new = list(decode(model, idx, max_new_tokens, **kwargs))
    finally:
        model.train(was_training)
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def visible_text(text: str, stops: Sequence[str] = (), final: bool = False) -> tuple[str, bool]:
    """The part of generated ``text`` that may be shown, and whether a stop string ended it.

    Text ends before the first stop string. Until ``final``, a trailing partial UTF-8
    character (decoded as U+FFFD) and a trailing prefix of a stop string are held back, since
    the next token may complete them; what is shown therefore never needs taking back."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    if final:
        return text, False
    keep = len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, keep), 0, -1):
            if text[keep - n : keep] == stop[:n]:
                keep -= n
                break
    return text[:keep], False


def sample_texts(
    model: GPT,
    tokenizer,
    prompt: Sequence[int],
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1337,
    stops: Sequence[str] = (),
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    window_keep: int | None = None,
    compile: bool = False,
) -> list[str]:
    """Continue ``prompt`` (token ids) ``num_samples`` times as one batch; returns the new text
    of each sample, cut before the first stop string. ``on_text(i, piece)`` receives each
    sample's text as it is generated (for streaming). Same seed, same texts. Only ids the
    tokenizer can decode are drawn (a model's vocabulary may be padded past it)."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[list[int]] = [[] for _ in range(num_samples)]
    shown, done = [""] * num_samples, [False] * num_samples

    def show(i: int, final: bool) -> None:
        text, done[i] = visible_text(tokenizer.decode(new[i]), stops, final)
        if on_text is not None and len(text) > len(shown[i]):
            on_text(i, text[len(shown[i]) :])
        shown[i] = text

    steps = decode(
        model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, window_keep,
        vocab_size=tokenizer.n_vocab, compile=compile,
    )  # fmt: skip
    for token in steps:
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                new[i].append(t)
                show(i, final=False)
        if all(done):
            break
    for i in range(num_samples):
        if not done[i]:
            show(i, final=True)
    return shown
