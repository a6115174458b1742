"""The profiler a run uses when ``trainer.profiler`` is not set.

Lightning wraps every hook call (each hook of each callback, a dozen per training step) in
``trainer.profiler.profile(name)``. Its default ``PassThroughProfiler`` records nothing but
still enters a generator-based context manager each time, which was a measurable part of
the training path's cost per step (BENCHMARKS.md, "Platform overhead per step"). This one
records nothing either and returns one shared no-op context."""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch.profilers import PassThroughProfiler

_NOTHING = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` without a context manager made per profiled call."""

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NOTHING
