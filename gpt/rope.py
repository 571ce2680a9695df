"""Rotary position tables (Su et al. 2021) and their scaling past the trained context.

A rotary model rotates each pair (x[i], x[i + D/2]) of a query or key at position p by the
angle p * inv_freq[i], inv_freq[i] = theta^(-2i/D). ``model.rope_scaling`` changes the
inverse frequencies (and may scale cos and sin by an attention factor) so that a model
trained on ``original_max_position_embeddings`` positions runs on ``factor`` times as many.
The definitions are transformers' own, ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``
(checked against transformers 5 in tests/test_rope.py); the formulas are written out here,
in float64, so that no run depends on transformers. docs/long-context.md explains the choices.

- ``linear``: position interpolation (Chen et al. 2023): every inverse frequency / factor.
- ``dynamic``: dynamic NTK (bloc97 and emozilla, 2023): for a sequence of L > L0 positions the
  base becomes theta * (factor L / L0 - (factor - 1))^(D / (D - 2)); at L <= L0 it is theta.
- ``yarn``: YaRN (Peng et al. 2023): frequencies that turn fewer than ``beta_slow`` times over
  L0 are interpolated (/ factor), those that turn more than ``beta_fast`` times are kept, a
  linear ramp over the dimensions between; cos and sin are scaled by 0.1 ln(factor) + 1.
- ``llama3``: Llama 3.1's: wavelengths above L0 / low_freq_factor are interpolated, those
  below L0 / high_freq_factor are kept, a ramp in L0 / wavelength between.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
REQUIRED_KEYS = ("type", "factor", "original_max_position_embeddings")
# optional sub-keys of each type and their defaults (None: absent, derived)
OPTIONAL_KEYS: dict[str, dict[str, Any]] = {
    "linear": {},
    "dynamic": {},
    "yarn": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
        "attention_factor": None,
        "mscale": None,
        "mscale_all_dim": None,
    },
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
}
KEY = "model.rope_scaling"


def _number(scaling: dict, key: str, *, above: float | None = None, min: float | None = None):
    value = scaling[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (above is None or value > above) and (min is None or value >= min):
        return float(value)
    rule = f">= {min:g}" if min is not None else f"> {above:g}"
    raise ValueError(f"{KEY}.{key} must be a number {rule}, got {value!r}")


def resolve_scaling(scaling: dict) -> dict:
    """``model.rope_scaling`` checked, with every default filled in (numbers as float, the
    original length an int); {} (no scaling) for an empty table. ValueError naming the
    sub-key ``model.rope_scaling.<key>`` and what is valid."""
    if not scaling:
        return {}
    kind = scaling.get("type")
    if kind not in SCALING_TYPES:
        got = "is missing" if "type" not in scaling else f"= {kind!r} is not valid"
        raise ValueError(f"{KEY}.type {got}; choose one of {', '.join(SCALING_TYPES)}")
    valid = [*REQUIRED_KEYS, *OPTIONAL_KEYS[kind]]
    for key in scaling:
        if key not in valid:
            raise ValueError(
                f"{KEY}.{key} is not a key of type {kind!r}; valid: {', '.join(valid)}"
            )
    for key in REQUIRED_KEYS[1:]:
        if key not in scaling:
            raise ValueError(f"{KEY}.{key} is missing; type {kind!r} needs {', '.join(valid[:3])}")
    out: dict[str, Any] = {"type": kind, "factor": _number(scaling, "factor", min=1)}
    original = scaling["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(
            f"{KEY}.original_max_position_embeddings must be a positive integer (the context "
            f"the model was trained on), got {original!r}"
        )
    out["original_max_position_embeddings"] = original
    for key, default in OPTIONAL_KEYS[kind].items():
        if key not in scaling:
            if default is not None:
                out[key] = default
        elif key == "truncate":
            if not isinstance(scaling[key], bool):
                raise ValueError(f"{KEY}.truncate must be true or false, got {scaling[key]!r}")
            out[key] = scaling[key]
        else:
            out[key] = _number(scaling, key, above=0)
    if kind == "yarn":
        if out["beta_fast"] <= out["beta_slow"]:
            raise ValueError(
                f"{KEY}.beta_fast ({out['beta_fast']:g}) must be larger than "
                f"{KEY}.beta_slow ({out['beta_slow']:g}): rotations over the original context "
                "above beta_fast are kept, below beta_slow interpolated"
            )
        if ("mscale" in out) != ("mscale_all_dim" in out):
            given, other = ("mscale", "mscale_all_dim")[:: 1 if "mscale" in out else -1]
            raise ValueError(
                f"{KEY}.{given} needs {KEY}.{other} too: the attention factor is "
                "mscale(factor, mscale) / mscale(factor, mscale_all_dim) (transformers ignores "
                "one alone); give both or neither"
            )
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(
            f"{KEY}.high_freq_factor ({out['high_freq_factor']:g}) must be larger than "
            f"{KEY}.low_freq_factor ({out['low_freq_factor']:g})"
        )
    return out


def scaled_length(block_size: int, scaling: dict) -> int:
    """Positions a model with this scaling runs: block_size without scaling, else the larger
    of block_size and factor x original_max_position_embeddings."""
    if not scaling:
        return block_size
    scaled = math.ceil(scaling["factor"] * scaling["original_max_position_embeddings"])
    return max(block_size, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor, 0.1 * mscale * ln(scale) + 1 (Peng et al. 2023, eq. 21)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv: Tensor, head_dim: int, theta: float, s: dict) -> tuple[Tensor, float]:
    factor, original = s["factor"], s["original_max_position_embeddings"]
    if "attention_factor" in s:
        attention = s["attention_factor"]
    elif "mscale" in s:
        attention = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
    else:
        attention = yarn_mscale(factor)

    def dimension(rotations: float) -> float:  # the dimension that turns this often over L0
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(s["beta_fast"]), dimension(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    i = torch.arange(head_dim // 2, dtype=torch.float64, device="cpu")
    ramp = ((i - low) / (high - low)).clamp(0, 1)  # 0: kept (fast dims), 1: interpolated
    keep = 1 - ramp
    interpolated = inv / factor
    # interpolated (1 - keep) + inv keep, written so that factor 1 gives inv bit for bit
    return interpolated + (inv - interpolated) * keep, attention


def _llama3(inv: Tensor, s: dict) -> Tensor:
    factor, original = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > original / low, inv / factor, inv)
    smooth = (original / wavelength - low) / (high - low)
    # (1 - smooth) inv / factor + smooth inv, written so that factor 1 gives inv bit for bit
    smoothed = scaled / factor + smooth * (scaled - scaled / factor)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """(inv_freq (head_dim // 2,) float64, attention factor) of an (unresolved or resolved)
    ``model.rope_scaling``; ``seq_len`` is the sequence length ``dynamic`` scales for
    (default and minimum: the original length)."""
    f64 = dict(dtype=torch.float64, device="cpu")  # real tensors even under a meta device
    exponent = torch.arange(0, head_dim, 2, **f64) / head_dim
    s = resolve_scaling(scaling or {})
    if s.get("type") == "dynamic":
        original = s["original_max_position_embeddings"]
        length = max(seq_len or original, original)
        if length > original:  # at the original length (or below) the base is theta
            ratio = s["factor"] * length / original - (s["factor"] - 1)
            theta = theta * ratio ** (head_dim / (head_dim - 2))
    inv = theta ** (-exponent)
    if s.get("type") == "linear":
        return inv / s["factor"], 1.0
    if s.get("type") == "yarn":
        return _yarn(inv, head_dim, theta, s)
    if s.get("type") == "llama3":
        return _llama3(inv, s), 1.0
    return inv, 1.0


def rope_tables(
    length: int,
    head_dim: int,
    theta: float,
    scaling: dict | None = None,
    start: int = 0,
    seq_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles of positions [start, start + length), each
    (length, head_dim // 2) float32, times the attention factor (as transformers scales
    them). Without scaling these are the tables of unscaled RoPE."""
    inv, attention = inverse_frequencies(head_dim, theta, scaling, seq_len)
    positions = torch.arange(start, start + length, dtype=torch.float64, device="cpu")
    angles = positions[:, None] * inv  # (L, D/2)
    cos, sin = angles.cos(), angles.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.float(), sin.float()
