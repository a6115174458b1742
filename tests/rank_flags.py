"""The worker of test_nonfinite's two-process check, in a module of its own so that each
spawned process imports only this (not the test module's imports)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def flags_seen(rank: int, folder: str) -> None:
    """Joins a 2-process gloo group; writes what ``any_rank`` returns when only rank 0 sees a
    bad value (as only one FSDP rank's shard may hold the inf), then when none does."""
    from plugformer.training.ranks import any_rank

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        seen = [bool(any_rank(torch.tensor(rank == 0))), bool(any_rank(torch.tensor(False)))]
        Path(folder, f"rank{rank}").write_text(str(seen))
    finally:
        dist.destroy_process_group()
