"""Autoregressive decoding with a KV cache, and the sampling filters.

Decoding feeds the prompt through the model once (the prefill, which fills ``KVCache``) and
then one new token at a time, reusing the keys and values of every earlier position: each
step costs one token's forward pass instead of the whole context's. The logits equal those
of nanoGPT's method, which recomputes the full context at every step (``use_cache=False``).

Past ``block_size`` the window slides. Cached keys depend on the positions (and the context)
they were computed with, so a full cache is rebuilt by a prefill of the window's last
``window_keep`` tokens. The default, ``block_size``, is nanoGPT's crop exactly: the model
always sees the last ``block_size`` tokens, and the cache is rebuilt for every new token, so
decoding past ``block_size`` runs at the speed of full recomputation. A smaller
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
from torch import Tensor

from gpt.model import GPT, KVCache


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
) -> Iterator[Tensor]:
    """Yield the next token of each sequence of ``idx`` (B, T), a (B,) tensor per step, for
    ``max_new_tokens`` steps. Put the model in eval mode first (dropout would randomise it).
    ``use_cache=False`` recomputes the whole window at every step (nanoGPT's method);
    ``window_keep`` is the context kept when a full cache is rebuilt (module docstring)."""
    check_sampling(temperature, top_k, top_p)
    block = model.cfg.block_size
    keep = block if window_keep is None else window_keep
    if not 1 <= keep <= block:
        raise ValueError(f"--window-keep must be in [1, block_size = {block}], got {keep}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    context, cache = idx[:, -block:], None
    dtype = next(model.parameters()).dtype
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(context[:, -block:])
        elif cache is None:  # prefill with the prompt
            cache = KVCache(model.cfg, idx.shape[0], device=idx.device, dtype=dtype)
            logits = model(context, kv_cache=cache)
        elif cache.length == block:  # the window slides: rebuild from its last tokens
            cache.length = 0
            logits = model(context[:, -keep:], kv_cache=cache)
        else:
            logits = model(context[:, -1:], kv_cache=cache)
        token = next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        context = torch.cat([context[:, -block:], token[:, None]], dim=1)
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
) -> list[str]:
    """Continue ``prompt`` (token ids) ``num_samples`` times as one batch; returns the new text
    of each sample, cut before the first stop string. ``on_text(i, piece)`` receives each
    sample's text as it is generated (for streaming). Same seed, same texts."""
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
        model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, window_keep
    )
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
