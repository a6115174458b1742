"""What the benchmark scripts share: measuring one pass in a fresh process, and writing a
benchmark's section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_section(out: Path, text: str, start: str, end: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` (which ``text`` includes)
    with ``text``, or append it; every other section of the file stays as it is."""
    current = out.read_text() if out.exists() else "# Benchmarks\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        updated = head + text + rest.split(end, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(updated)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_pass(step: Callable[[], None], device: str, repeats: int) -> dict[str, float | None]:
    """Peak memory and median time of ``step`` (one forward+backward pass, which must
    synchronize on CUDA), after one warm-up pass.

    Memory on CPU: how far one pass raises the process's peak resident memory (VmHWM, reset
    through /proc/self/clear_refs) above its resident memory just before it; run the process
    with :data:`WORKER_ENV` so freed tensors go back to the system. On CUDA:
    ``max_memory_allocated()`` minus the memory allocated before the pass.
    """
    import torch

    step()  # warm-up: lazy initialization, kernel selection, thread pools
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
        before = _status_kib("VmRSS")
        step()
        peak = (_status_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"memory_mib": peak / 2**20, "time_ms": 1000 * statistics.median(times) if times else None}


#: glibc settings for a measuring process: freed tensors are returned to the system at once.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_worker(script: str, spec: dict[str, Any], cwd: Path) -> dict[str, Any] | None:
    """``script --worker <spec as JSON>`` in a fresh process (no allocator state carried
    over); its last stdout line parsed as JSON, or None (with its stderr shown) if it failed."""
    done = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
        env={**os.environ, **WORKER_ENV}, cwd=cwd,
    )
    if done.returncode != 0:
        print(f"  {spec}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
