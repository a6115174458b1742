"""How many CPU threads torch uses in each training process.

torch's default is one thread per core in every process, so two DDP ranks on two cores run
four threads that wait on each other: on a loaded 2-core machine the same training ran 8×
slower than with one thread per process. A run therefore gives each process its share of
the cores it may use: ``len(os.sched_getaffinity(0))`` divided by the processes of this node
(``LOCAL_WORLD_SIZE`` under torchrun, else ``trainer.devices``). ``cpu_threads=<n>`` in the
config sets the number; an ``OMP_NUM_THREADS`` set in the environment is respected.
"""

from __future__ import annotations

import os
from typing import Any

from plugformer.errors import ConfigError


def processes_on_this_node(trainer: Any) -> int:
    """Training processes that share this machine's cores: torchrun's ``LOCAL_WORLD_SIZE``,
    else the number of devices Lightning starts a process for (``trainer.devices``)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit():
        return max(1, int(local))
    devices = (trainer or {}).get("devices")
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return max(1, len(devices))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 1:
        return devices
    if devices == -1:  # every device: on CPU, Lightning starts one process per core
        return max(1, len(os.sched_getaffinity(0)))
    return 1


def choose_threads(cfg: Any) -> tuple[int | None, str]:
    """(threads for torch, why), or (None, why) when the environment already decides."""
    setting = cfg.get("cpu_threads") if hasattr(cfg, "get") else None
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ConfigError(
                f"cpu_threads={setting!r}: expected an integer >= 1, or null to divide the cores among the processes.",
                fix="cpu_threads=1, or leave it out",
            )
        return setting, f"cpu_threads={setting}"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0))
    processes = processes_on_this_node(cfg.get("trainer") if hasattr(cfg, "get") else None)
    return max(1, cores // processes), f"{cores} cores / {processes} process{'es' if processes > 1 else ''}"


def apply_threads(cfg: Any) -> str:
    """Set torch's intra-op threads for this process as :func:`choose_threads` says; returns
    a line for the console (``N CPU thread(s) per process (why)``)."""
    import torch

    threads, why = choose_threads(cfg)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    return f"{count} CPU thread{'s' if count > 1 else ''} per process ({why})"
