"""Checkpoints and files written atomically: a kill mid-write never leaves a corrupt file
under the final name, because the bytes go to a temporary file that is renamed at the end.

A kill leaves at most the temporary file (``.<name>.<random>.tmp``), which
:func:`remove_orphan_temporaries` deletes when the next run in that directory starts. A full
disk ends the run with one message; the previous file under the final name is untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from plugformer.errors import PlugformerError


class DiskFullError(PlugformerError):
    """The disk filled up while a file of the run was written."""


def replace_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(handle)`` to a temporary file in the same folder, then
    rename it over ``path``. On any failure the temporary file is removed and ``path`` keeps
    its previous content; a full disk raises :class:`DiskFullError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        previous = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} exists"
        raise_if_disk_full(error, path, previous)
        raise


def raise_if_disk_full(error: BaseException, path: Path, kept: str) -> None:
    """Raise :class:`DiskFullError` (naming ``path`` and what was ``kept``) when ``error``
    comes from a full disk; otherwise return."""
    full = _disk_full_error(error)
    if full is not None:
        raise DiskFullError(
            f"The disk is full: writing {path} failed ({full.strerror}); {kept}.",
            expected=f"free space in {path.parent}",
            fix="free some space (or point paths.runs_dir elsewhere), then resume=<run dir>",
        ) from error


def _disk_full_error(error: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``error`` (torch.save reports a failed write as a
    RuntimeError whose context is the OSError), or None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def write_json_atomically(path: Path, data: Any) -> None:
    replace_atomically(Path(path), lambda handle: handle.write((json.dumps(data, indent=2, default=str) + "\n").encode()))


def remove_orphan_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files and directories (sharded checkpoints) that killed atomic
    writes left in ``folder`` (call only while holding the run's lock: nobody else writes
    there). Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        elif tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (``.<name>.<random>.tmp``), which
    :func:`remove_orphan_temporaries` recognises."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system does not offer it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # e.g. a file system without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(b))


def replace_directory_atomically(written: Path, path: Path) -> None:
    """Put the complete directory ``written`` (a temporary sibling of ``path``) under the
    name ``path``, replacing what was there, so that ``path`` is never half written: its
    files are flushed to disk, then the two are swapped in one atomic rename (Linux), and
    the previous content is deleted. Without an atomic swap (other systems) the previous
    content is renamed away first, so a crash between the two renames leaves ``path``
    absent (never partial) and both versions as temporaries."""
    _fsync_tree(written)
    if not path.exists() and not path.is_symlink():
        os.replace(written, path)
        return
    if path.is_dir() and not path.is_symlink() and _exchange(written, path):
        shutil.rmtree(written)  # now the previous content
        return
    previous = temporary_sibling(path)
    os.replace(path, previous)
    os.replace(written, path)
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with a write-then-rename save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        replace_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))
