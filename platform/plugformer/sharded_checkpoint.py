"""Reading a sharded checkpoint (``trainer=fsdp`` with ``trainer.fsdp.state_dict_type:
sharded``) in one process, without a process group: a directory holding
torch.distributed.checkpoint's shard files (``__<rank>_0.distcp``, ``.metadata``) with the
model and optimizer state, and Lightning's ``meta.pt`` with everything else (global step,
loops, callbacks, the run's record).

Model keys are stored under ``model.`` followed by the training module's own names
(``model.model.token_embedding.weight``); optimizer state under ``optimizer_<i>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METADATA_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
_MODEL_PREFIX = "model."


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (Lightning's own test)."""
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's non-tensor part (``global_step``, loops, callbacks, ...)."""
    import torch

    return torch.load(Path(path) / METADATA_FILE, map_location="cpu", weights_only=False)


def _tensor_entries(path: Path) -> dict[str, Any]:
    """Model tensor name (as in the training module's state_dict) → DCP storage metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        name.removeprefix(_MODEL_PREFIX): entry
        for name, entry in metadata.state_dict_metadata.items()
        if name.startswith(_MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)
    }


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every model tensor, read from the shard index only."""
    return {name: tuple(entry.size) for name, entry in _tensor_entries(path).items()}


def load_model_state(path: Path) -> dict[str, Any]:
    """The model's full state dict (the training module's names, ``model.`` first), its
    shards put together on the CPU in this process."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load

    entries = _tensor_entries(path)
    state = {name: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for name, entry in entries.items()}
    nested = {"model": state}
    load(nested, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return nested["model"]
