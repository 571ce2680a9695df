"""Attention backends: a registry from a name to one function.

Every backend has the same signature::

    fn(q, k, v, causal: bool, scale: float) -> out

with q of shape (B, H, T, D) and k, v of shape (B, H_kv, S, D), where H is a multiple of
H_kv (grouped-query attention, Ainslie et al. 2023: query head h reads key/value head
h // (H // H_kv)). The output has q's shape. When ``causal`` is true, T <= S and query i
attends to keys 0..S - T + i: the mask is aligned to the bottom-right corner (FlashAttention-2's
convention), the T queries being the last T of the S positions. T == S is the usual lower
triangle (training, a prefill); T < S is a KV-cache step of T new tokens after S - T cached
ones (one decoded token, a chunk of a long prompt, a query after a shared few-shot prefix).
Attention-weight dropout is not part of the contract (the FlashAttention kernel has none); the
model applies dropout to residual branches instead.

Adding a backend is one call to ``register_attention`` with a loader that returns the
function, or raises ``BackendUnavailable`` saying why it cannot run here. A renamed backend
keeps its old name in ``ALIASES``: ``get_attention`` and config validation accept it (so
configs and checkpoints that name it still load), the lists of names do not show it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from gpt.kernels.reference import causal_mask, check_shapes, naive_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, bool, float], Tensor]


class BackendUnavailable(Exception):
    """Raised by a loader when its backend cannot run on this machine; the message says why."""


_LOADERS: dict[str, Callable[[], AttentionFn]] = {}
# Old name -> current name. "triton-hopper" named a GPU for what is a packed grouped-query,
# split-loop kernel (issue 23).
ALIASES = {"triton-hopper": "triton-packed-gqa"}


def register_attention(name: str, loader: Callable[[], AttentionFn]) -> None:
    """Register ``loader`` under ``name``; it is called on first use and returns the backend."""
    _LOADERS[name] = loader


def canonical_attention_name(name: str) -> str:
    """The current name of a backend called ``name`` (itself unless an old alias)."""
    return ALIASES.get(name, name)


def attention_names() -> list[str]:
    return sorted(_LOADERS)


def attention_status() -> dict[str, str | None]:
    """Each registered name mapped to None if it runs here, else the reason it does not."""
    status = {}
    for name in attention_names():
        try:
            _LOADERS[name]()
            status[name] = None
        except BackendUnavailable as err:
            status[name] = str(err)
    return status


def get_attention(name: str) -> AttentionFn:
    """Resolve a backend by name (or an old alias); ValueError if it is unknown or cannot
    run here."""
    name = canonical_attention_name(name)
    if name not in _LOADERS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid names: {', '.join(attention_names())}"
        )
    try:
        return _LOADERS[name]()
    except BackendUnavailable as err:
        usable = [n for n, why in attention_status().items() if why is None]
        raise ValueError(
            f"attention backend {name!r} is unavailable here: {err}. "
            f"Usable here: {', '.join(usable)}"
        ) from None


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale=None) -> Tensor:
    """PyTorch's fused scaled_dot_product_attention (flash / efficient / cuDNN / math)."""
    check_shapes(q, k, v, causal)
    gqa = q.shape[1] != k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if causal and T != S and T > 1:  # a chunked prefill: is_causal aligns top-left, we need
        # bottom-right. PyTorch's CausalBias says so without a mask tensor, which keeps the
        # fused (memory-efficient) kernel on a GPU; torch.compile cannot build one in a graph,
        # so compiled code passes the explicit mask (the same attention: tested)
        mask = (
            causal_mask(T, S, q.device)
            if torch.compiler.is_compiling()
            else causal_lower_right(T, S)
        )
        return F.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=gqa)
    # one query after S keys sees all of them: no mask at all
    causal = causal and T == S
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def _load_triton(kernel: str = "flash_attention") -> AttentionFn:
    """The function ``kernel`` of the module gpt.kernels.``kernel``, imported on first use."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            "it needs an NVIDIA GPU, or TRITON_INTERPRET=1 set before start-up to run in "
            "Triton's interpreter on the CPU (slow; for correctness checks)"
        )
    try:
        module = importlib.import_module(f"gpt.kernels.{kernel}")
    except ImportError as err:
        raise BackendUnavailable(f"cannot import gpt.kernels.{kernel} ({err})") from None
    return getattr(module, kernel)


register_attention("naive", lambda: naive_attention)
register_attention("sdpa", lambda: sdpa_attention)
register_attention("triton", _load_triton)
# issue 17's restructured kernel, kept apart until an H100 measures it against "triton"
register_attention("triton-packed-gqa", lambda: _load_triton("flash_attention_packed_gqa"))
