"""Faster paths through Lightning machinery that every training step pays for, same results.

Lightning wraps every hook call (each hook of each callback, a dozen per training step) in
``trainer.profiler.profile(name)``. Its default ``PassThroughProfiler`` records nothing but
still enters a generator-based context manager each time; :class:`NoProfiler`, the profiler
of a run that sets no ``trainer.profiler``, returns one shared no-op context instead.

``LightningModule.log`` ends in ``_ResultCollection.log``, which moves the logged metric's
record to the value's device on every call: ``_ResultMetric.to`` rebuilds the record's whole
``__dict__`` through ``apply_to_collection`` (recursing into its metadata dataclass, with
copies), even when every tensor is already there. With the default logging that was the
largest part of what logging costs a training step (BENCHMARKS.md, "Platform overhead per
step"). :func:`install` makes a move to the device the record is already on return at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.profilers import PassThroughProfiler
from torch import Tensor

_installed = False
_NOTHING = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` without a context manager made per profiled call."""

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NOTHING


def _tensors_in(record: Any) -> list[Tensor] | None:
    """The tensors a result record holds directly or in a dict or list attribute; None when
    it holds anything else that a move would touch (a torchmetrics Metric)."""
    from torchmetrics import Metric

    found: list[Tensor] = []
    for value in vars(record).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, Metric):
                return None
            if isinstance(item, Tensor):
                found.append(item)
    return found


def install() -> None:
    """Patch ``_ResultMetric.to`` once per process (idempotent). Any other call, and any
    record with a tensor elsewhere or a Metric inside, takes Lightning's own path."""
    global _installed
    if _installed:
        return
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric

    original = _ResultMetric.to

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.device):
            tensors = _tensors_in(self)
            if tensors is not None and all(t.device == args[0] for t in tensors):
                return self
        return original(self, *args, **kwargs)

    _ResultMetric.to = to  # type: ignore[method-assign]
    _installed = True
