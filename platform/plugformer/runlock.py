"""One run directory, one run: a lock file in the run directory.

``run.lock`` holds the owner's pid, host and command line, and the owner keeps an exclusive
``flock`` on it for as long as it runs. The kernel drops that lock when the process dies
(SIGKILL included), so a lock file left by a dead process is simply taken over; the pid and
host are only there to name the owner in the refusal message.

Only the process that writes the run directory takes the lock: rank 0 of a DDP run (the
other ranks that Lightning or torchrun start share the folder by design).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from plugformer.errors import ConfigError

LOCK_FILE = "run.lock"

# Locks held by this process, by resolved run directory: a run directory locked by the
# launcher before Hydra starts is locked again (re-entrantly) once the config is composed.
_held: dict[Path, tuple[IO[str], int]] = {}


def _owner_text(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}: {owner.get('command')})"
    except (OSError, ValueError, AttributeError):
        return "another process"


def _in_use(run_dir: Path, path: Path) -> ConfigError:
    return ConfigError(
        f"The run directory {run_dir} is in use by {_owner_text(path)}.",
        expected="one process per run directory (the running one is left alone)",
        fix="wait for that run to end, or choose another run_dir=; resume= it once it has stopped",
    )


def check_free(run_dir: Path) -> None:
    """Raise :class:`ConfigError` when another process holds ``run_dir``'s lock; writes
    nothing (a folder that does not exist or holds no lock file is free)."""
    path = Path(run_dir).resolve() / LOCK_FILE
    if Path(run_dir).resolve() in _held:
        return
    try:
        handle = open(path)  # noqa: SIM115 - read-only: never creates the file
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(run_dir).resolve(), path) from None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` for this process (creating the folder), or raise :class:`ConfigError`
    naming the process that holds it. Calls nest; :func:`release` undoes one call."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        handle, depth = _held[run_dir]
        _held[run_dir] = (handle, depth + 1)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise _in_use(run_dir, path) from None
        # The owner may have removed the file between our open and our lock: retry on the new one.
        if path.exists() and os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
            break
        handle.close()
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(owner) + "\n")
    handle.flush()
    _held[run_dir] = (handle, 1)


def release(run_dir: Path) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file and unlocks."""
    run_dir = Path(run_dir).resolve()
    if run_dir not in _held:
        return
    handle, depth = _held[run_dir]
    if depth > 1:
        _held[run_dir] = (handle, depth - 1)
        return
    del _held[run_dir]
    # Remove while still locked, so a process waiting on this file never locks a stale inode.
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    handle.close()


@contextmanager
def locked(run_dir: Path | None) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (no lock when None) for the duration of the block."""
    if run_dir is None:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
