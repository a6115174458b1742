"""Agreement between training processes: what every rank must decide alike."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def any_rank(flag: Tensor) -> Tensor:
    """``flag`` (a bool scalar) or-ed over every process of the default process group, on its
    device and without waiting for it. Every rank must act alike: under FSDP each rank sees the
    norm of its own gradient shard only, and under DDP each its own loss, so a bad value one
    rank sees must make all of them skip (or stop), or their parameters and collectives drift
    apart. A single process returns ``flag`` unchanged."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    count = flag.to(torch.int32)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return count > 0
