"""A checkpoint's training state in a form that does not depend on the number of processes.

DeepSpeed's own checkpoint under ZeRO 1-3 holds each process's slice of the flattened fp32
master weights and Adam moments, so only the same number of processes with the same ZeRO
stage can load it. Beside it, every checkpoint also holds ``universal/``: for each trainable
parameter, by its name in the model, the whole fp32 master weight and both Adam moments,
gathered with DeepSpeed's tensor-fragment API (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``), plus the Adam step count, the loss scale and the
engine's counters. Loading scatters them into whatever partitioning the new run has. This is
the idea of DeepSpeed's universal checkpoint (Lian et al. 2024, arXiv:2406.18820), built from
the full state instead of converting DeepSpeed's files offline (``ds_to_universal``), which
needs Megatron-style metadata, unpickles its inputs and has open bugs for ZeRO-3 on more
processes.

    universal/index.json            format, Adam step, counters, every parameter: file, shape
    universal/rank00000.safetensors "{name}/fp32", "{name}/exp_avg", "{name}/exp_avg_sq" of
                                    the parameters i with i % world == 0 (rank r writes r)

Safetensors only: loading never unpickles anything. Cost: 12 bytes per parameter on disk per
checkpoint, and three gathers of every parameter while saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from gpt.fileio import write_atomic
from gpt.train import dist

UNIVERSAL = "universal"
INDEX = "index.json"
FORMAT = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's first and second moments
KINDS = ("fp32", *MOMENTS)  # saved per parameter, as "{name}/{kind}"
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class UniversalStateError(RuntimeError):
    """The universal state of a checkpoint cannot be used; the message names the file."""


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates, by name. Frozen ones (fine-tuning) are left out:
    they never change, so the model built on resume already holds them."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed holds this parameter's fp32 master and moments in slices (ZeRO 1-3,
    the bf16 optimizer) rather than whole in our optimizer's state."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def supported(engine, optimizer: torch.optim.Optimizer) -> bool:
    """True when every trainable parameter's state is reachable: sliced by DeepSpeed (read
    with its fragment API) or whole in ``optimizer`` itself (no wrapper in between)."""
    return all(_partitioned(p) for _, p in _trainable(engine)) or engine.optimizer is optimizer


def _gather(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Collective under ZeRO: the whole training state of one parameter, on every rank."""
    if _partitioned(p):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        state = {"fp32": safe_get_full_fp32_param(p)}
        state.update({k: safe_get_full_optimizer_state(p, k) for k in MOMENTS})
        return state
    own = optimizer.state.get(p, {})  # empty before the first step
    state = {"fp32": p.data.float()}
    for k in MOMENTS:
        state[k] = own[k] if k in own else torch.zeros_like(p, dtype=torch.float32)
    return state


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """Adam's step count (the same in every state: a skipped step leaves every one alone)."""
    steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
    assert len(steps) <= 1, f"optimizer states disagree on the step count: {sorted(steps)}"
    return steps.pop() if steps else 0


def save_universal(engine, optimizer: torch.optim.Optimizer, root: Path) -> None:
    """Collective: write ``root/universal/`` (see the module docstring). Every rank gathers
    every parameter (DeepSpeed's gathers are collectives) and keeps its own share."""
    rank, world = dist.rank(), dist.world_size()
    folder = root / UNIVERSAL
    _map_fragments(engine)
    mine: dict[str, torch.Tensor] = {}
    params = {}
    for i, (name, p) in enumerate(_trainable(engine)):
        shape = list(getattr(p, "ds_shape", p.shape))  # ZeRO-3: p itself is empty
        params[name] = {"file": f"rank{i % world:05d}.safetensors", "shape": shape}
        if not (_partitioned(p) or i % world == rank):
            continue  # whole here and in another rank's share: nothing to gather
        state = _gather(p, optimizer)
        if i % world == rank:
            for k in KINDS:
                mine[f"{name}/{k}"] = state[k].detach().float().cpu().contiguous()
    if mine or rank == 0:
        write_atomic(folder / f"rank{rank:05d}.safetensors", safetensors_bytes(mine))
    if rank == 0:
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        index = {
            "format": FORMAT,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "adam_step": adam_step(optimizer),
            "engine": {k: int(getattr(engine, k, 0)) for k in ENGINE_COUNTERS},
            "loss_scaler": {
                k: float(getattr(scaler, k)) for k in LOSS_SCALER_FIELDS if hasattr(scaler, k)
            },
            "params": params,
        }
        write_atomic(folder / INDEX, json.dumps(index, indent=1) + "\n")


def has_universal(ckpt: Path) -> bool:
    return (ckpt / UNIVERSAL / INDEX).is_file()


def read_index(ckpt: Path) -> dict:
    path = ckpt / UNIVERSAL / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UniversalStateError(f"{path}: unreadable ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UniversalStateError(f"{path}: not a universal state of format {FORMAT}")
    step = index.get("adam_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UniversalStateError(f"{path}: damaged: adam_step must be an integer >= 0")
    params = index.get("params")
    if not isinstance(params, dict):
        raise UniversalStateError(f"{path}: damaged: params must be an object")
    for name, entry in params.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        if (
            not isinstance(file, str)
            or Path(file).name != file
            or not file.endswith(".safetensors")
        ):
            raise UniversalStateError(
                f"{path}: damaged: params.{name}.file must name a .safetensors file beside it"
            )
    for key in ("engine", "loss_scaler"):
        table = index.get(key, {})
        if not isinstance(table, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in table.values()
        ):
            raise UniversalStateError(f"{path}: damaged: {key} must map names to numbers")
    return index


# Where DeepSpeed keeps the flat fp32 tensors that our optimizer updates: one per parameter
# group (ZeRO 1-2, bf16 optimizer) or sub-group (ZeRO-3, which hands them to the optimizer
# only for the duration of a step).
_FLAT_MASTERS = (
    "single_partition_of_fp32_groups",  # ZeRO 1-2
    "fp32_partitioned_groups_flat",  # ZeRO 3
    "fp32_groups_flat_partition",  # bf16 optimizer
)


def _master_tensors(engine, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    for attr in _FLAT_MASTERS:
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    return [p for group in optimizer.param_groups for p in group["params"]]


def _init_adam_state(engine, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Create Adam's state (zeros, ``step``) for every tensor ``optimizer`` updates, as its
    first step would, so that the moments can be written into it; then map each parameter's
    fragment onto it."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for hp in _master_tensors(engine, optimizer):
        state = optimizer.state[hp]
        if not state:
            state.update({k: torch.zeros_like(hp, dtype=torch.float32) for k in MOMENTS})
        device = hp.device if on_device else torch.device("cpu")
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    _map_fragments(engine)


def _map_fragments(engine) -> None:
    """Point every parameter's fragment at its slice of Adam's flat state (ZeRO 1-2 and the
    bf16 optimizer; ZeRO-3 reads the state directly). DeepSpeed 0.19.8 does it once, after
    the first parameter group's first step, so the other groups' parameters stay unmapped
    and ``safe_get_full_optimizer_state`` fails for them; mapping again is harmless."""
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _assign_weight(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Collective under ZeRO-3: set the model's own copy of a parameter (the one forward
    uses) from a whole fp32 value."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # re-sliced on exit
            p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))
        return
    p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))


def _set_zero3_slices(p: torch.nn.Parameter, values: dict, device: torch.device) -> None:
    """ZeRO-3: write this rank's slice of the fp32 master and the moments. (DeepSpeed's
    ``safe_set_full_*`` reads past the end of the value for the last, padded slice of a
    parameter whose size the world size does not divide.)"""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    rank, world, n = dist.rank(), dist.world_size(), p.ds_tensor.numel()
    if n != -(-p.ds_numel // world):  # MiCS: partitions over a subset of the ranks
        raise UniversalStateError(
            f"ZeRO-3 slices of {n} elements for a parameter of {p.ds_numel} on {world} ranks: "
            "only partitions over every rank (not MiCS) are supported"
        )

    def mine(value: torch.Tensor) -> torch.Tensor:
        piece = value.flatten()[rank * n : (rank + 1) * n]
        out = torch.zeros(n, dtype=torch.float32)
        out[: piece.numel()] = piece
        return out.to(device)

    safe_set_local_fp32_param(p, mine(values["fp32"]))
    for k in MOMENTS:
        safe_set_local_optimizer_state(p, mine(values[k]), k)


def load_universal(engine, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Collective: restore weights, fp32 masters, Adam moments and step, the loss scale and
    the engine's counters from ``ckpt/universal/`` into this run's partitioning, whatever the
    number of processes and ZeRO stage that wrote it. UniversalStateError naming the file if
    it does not match this model."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    folder = ckpt / UNIVERSAL
    index = read_index(ckpt)
    named = dict(_trainable(engine))
    saved = index["params"]
    if set(saved) != set(named):
        missing, extra = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
        raise UniversalStateError(
            f"{folder / INDEX}: parameters do not match this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    _init_adam_state(engine, optimizer, index["adam_step"])
    files = {}
    for name, p in named.items():
        entry = saved[name]
        path = folder / entry["file"]
        try:
            if path not in files:
                files[path] = safe_open(path, framework="pt", device="cpu")
            values = {k: files[path].get_tensor(f"{name}/{k}") for k in KINDS}
        except (OSError, SafetensorError) as err:
            raise UniversalStateError(f"{path}: cannot read {name} ({err})") from None
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if any(tuple(v.shape) != shape for v in values.values()):
            raise UniversalStateError(f"{path}: {name} has shape {entry['shape']}, not {shape}")
        device = p.device if not hasattr(p, "ds_id") else p.ds_tensor.device
        fp32 = values["fp32"].to(device)
        if hasattr(p, "ds_id"):
            _set_zero3_slices(p, values, device)
        elif _partitioned(p):
            safe_set_full_fp32_param(p, fp32)
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, values[k].to(device), k)
        else:
            for k in MOMENTS:
                optimizer.state[p][k].copy_(values[k].to(device))
        _assign_weight(p, fp32)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in index.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, type(getattr(scaler, k))(v))
    for k, v in index.get("engine", {}).items():
        if hasattr(engine, k):
            setattr(engine, k, v)
    dist.barrier()
