"""Which fused kernel PyTorch's scaled_dot_product_attention runs: the choice and its report.

``F.scaled_dot_product_attention`` (the ``sdpa`` attention backend) dispatches to one of
several kernels: cuDNN's fused attention, FlashAttention-2 (Dao 2023), the memory-efficient
kernel of xFormers (Rabe & Staats 2021), or the unfused math path; on the CPU, a flash-style
CPU kernel or the math path. PyTorch picks the first kernel of its priority order that
supports the inputs, and its default order puts cuDNN last, so on an H100 the `sdpa`
backend ran FlashAttention-2 although cuDNN was 1.6x faster at GPT-2's shape
(bench/results/h100-2026-11-26/). ``model.sdpa_kernels`` makes the order explicit:

    []                                   auto: cudnn, flash, efficient, math on a Hopper GPU
                                         (sm90), else flash, efficient, math
    ["flash", "efficient", "math"]       FlashAttention-2 first, cuDNN never
    ["math"]                             the unfused reference only

The list is both the order and the set allowed: a kernel left out is never used, and one
that cannot take the inputs (cuDNN with too old a library, flash with fp32 inputs) is passed
over for the next. ``sdpa_kernel_report`` says which kernel actually ran, read off the
profiler's operator names; runs record it (run.json, bench/trainer.py's bench.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
HOPPER_ORDER = ("cudnn", "flash", "efficient", "math")
DEFAULT_ORDER = ("flash", "efficient", "math")
# the aten operator each kernel runs as (forward; the backward's name adds "_backward"),
# most specific first: "flash_attention_for_cpu" also contains "flash_attention"
OPERATORS = (
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention_for_cpu", "flash"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_efficient_attention", "efficient"),
    ("_scaled_dot_product_attention_math", "math"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
)


def check_sdpa_kernels(names: Sequence[str], key: str = "model.sdpa_kernels") -> None:
    """ValueError naming ``key`` for a name that is not an SDPA kernel."""
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(
            f"{key}: unknown SDPA kernel(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(KERNELS)}, in priority order (an empty list: auto, "
            f"{', '.join(HOPPER_ORDER)} on a Hopper GPU, else {', '.join(DEFAULT_ORDER)})"
        )


def sdpa_order(names: Sequence[str], device: torch.device | str | None = None) -> tuple[str, ...]:
    """The priority order ``names`` stands for on ``device`` (default: the current CUDA
    device if there is one, else the CPU): the names themselves, duplicates dropped, or for
    an empty list cuDNN first on a Hopper GPU (compute capability 9.x) and FlashAttention-2
    first elsewhere."""
    check_sdpa_kernels(names)
    if names:
        return tuple(dict.fromkeys(names))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_ORDER
    return DEFAULT_ORDER


@contextlib.contextmanager
def sdpa_priority(order: Sequence[str]) -> Iterator[None]:
    """Within this context, scaled_dot_product_attention tries the kernels of ``order`` (names
    of ``KERNELS``) in that order and no other. torch.compile traces it (the kernel is chosen
    when the graph is traced, under this context)."""
    with sdpa_kernel([KERNELS[n] for n in order], set_priority=True):
        yield


def kernel_of(operators: Sequence[str]) -> str | None:
    """The kernel name of the first SDPA operator among profiler event names, or None."""
    for name in operators:
        for op, kernel in OPERATORS:
            if op in name:
                return kernel
    return None


def sdpa_kernel_report(
    order: Sequence[str],
    q_shape: tuple[int, int, int, int],
    kv_heads: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict:
    """Which kernel scaled_dot_product_attention runs, forward and backward, for causal
    attention of queries of ``q_shape`` (B, H, T, D) and ``kv_heads`` key/value heads under
    ``order``, called through the ``sdpa`` backend as the model calls it: the profiler's
    operator names, and the kernel's name ("cudnn", "flash", ...; "flash" on the CPU is
    PyTorch's flash-style CPU kernel). The kernel does not depend on the batch size, so a
    one-row probe stands for a training step's."""
    from torch.profiler import ProfilerActivity, profile

    from gpt.attention import sdpa_attention  # gpt.attention is the backends' registry

    B, H, T, D = q_shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(heads: int) -> torch.Tensor:
        x = torch.randn(B, heads, T, D, generator=gen, device=device, dtype=dtype)
        return x.requires_grad_()

    q, k, v = rand(H), rand(kv_heads), rand(kv_heads)
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_priority(order):
        out = sdpa_attention(q, k, v, True, D**-0.5)
        out.sum().backward()
    ops = [e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::")]
    forward = [n for n in ops if "backward" not in n]
    backward = [n for n in ops if "backward" in n]
    return {
        "priority": list(order),
        "kernel": kernel_of(forward),
        "forward_op": next((n for n in forward if kernel_of([n])), None),
        "backward_op": next((n for n in backward if kernel_of([n])), None),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }


TRAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sdpa_runs(
    order: Sequence[str], head_dim: int, dtype: torch.dtype, device, masked: bool = False
) -> bool:
    """Whether some kernel of ``order`` takes causal attention of ``head_dim`` in ``dtype``
    on ``device``: a two-token probe (``masked``: with an explicit mask, as decoding with a
    KV cache calls it, which the flash kernels do not take)."""
    q = torch.zeros(1, 1, 2, head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, 1, 3, head_dim, dtype=dtype, device=device)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device).tril(1) if masked else None
    try:
        with sdpa_priority(order):
            if masked:
                torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask)
            else:
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError:
        return False
    return True


def usable_kernels(head_dim: int, dtype: torch.dtype, device, masked: bool = False) -> list[str]:
    """The SDPA kernels that run here for these inputs, each alone."""
    return [n for n in KERNELS if sdpa_runs((n,), head_dim, dtype, device, masked)]


def not_usable(names: Sequence[str], order, head_dim: int, dtype, device, masked=False) -> str:
    """Why ``model.sdpa_kernels = names`` cannot run here, naming the key and what can."""
    usable = usable_kernels(head_dim, dtype, device, masked)
    what = "decoding with a KV cache (an explicit mask)" if masked else "causal attention"
    return (
        f"model.sdpa_kernels = {list(names)}: no kernel of {', '.join(order)} runs "
        f"{what} in {str(dtype).removeprefix('torch.')} on {device} (head size {head_dim}); "
        f"here: {', '.join(usable) or 'none'}. Use [] (auto) or list one of those"
    )


def run_sdpa_report(model_cfg, train_dtype: str, device: torch.device | str) -> dict | None:
    """``sdpa_kernel_report`` for one sequence of a model of ``model_cfg`` (a ModelConfig)
    trained in ``train_dtype`` (train.dtype: what the attention's inputs are under autocast)
    on ``device``; None when the model's attention backend is not ``sdpa``. What run.json
    and bench.json record. ValueError naming model.sdpa_kernels when none of its kernels
    runs here."""
    if model_cfg.attention != "sdpa":
        return None
    H = model_cfg.n_head
    shape = (1, H, model_cfg.block_size, model_cfg.n_embd // H)
    order, dtype = sdpa_order(model_cfg.sdpa_kernels, device), TRAIN_DTYPES[train_dtype]
    if not sdpa_runs(order, shape[-1], dtype, device):  # found before any work, every rank
        raise ValueError(not_usable(model_cfg.sdpa_kernels, order, shape[-1], dtype, device))
    return sdpa_kernel_report(order, shape, model_cfg.kv_heads, dtype, device)
