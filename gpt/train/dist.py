"""The few process-group idioms the trainer needs, each a no-op in a world of one.

Two planes: tensors of the model (losses, gradient flags) are reduced on the training device
with the default group, asynchronously with respect to the host; small host-side decisions
(stop now? every rank must agree) are voted on over a CPU (gloo) group, so asking never
waits for the GPU to drain its queue.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

_cpu_group = None
_timeout: datetime.timedelta | None = None  # of every group: see engine.init_distributed


def set_timeout(seconds: float) -> None:
    """The timeout of groups created here (the CPU group), as the default group's."""
    global _timeout
    _timeout = datetime.timedelta(seconds=seconds)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over every rank (sum | min | max); returns ``tensor``. No host sync."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def cpu_group():
    """A gloo group over every rank for host-side votes (the default group may be NCCL)."""
    global _cpu_group
    if _cpu_group is None:
        default_is_gloo = dist.get_backend() == "gloo"
        _cpu_group = (
            dist.group.WORLD
            if default_is_gloo
            else dist.new_group(backend="gloo", timeout=_timeout)  # None: torch's default
        )
    return _cpu_group


def vote_max(values: list[int]) -> list[int]:
    """The element-wise maximum of small integer ``values`` over every rank (e.g. "has any
    rank been signalled?"), computed on the host: it never synchronises a GPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return [int(v) for v in t.numpy()]  # a CPU tensor: numpy reads it without a device sync


def broadcast_object(obj):
    """Rank 0's ``obj`` (a small picklable value) on every rank, over the CPU group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]
