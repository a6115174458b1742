"""Checkpoints and files written atomically: a kill mid-write never leaves a corrupt file
under the final name, because the bytes go to a temporary file that is renamed at the end."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _replace_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    _replace_atomically(Path(path), lambda handle: handle.write((json.dumps(data, indent=2, default=str) + "\n").encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with a write-then-rename save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        _replace_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))
