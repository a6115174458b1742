"""Measurements of a model for compression reports: the size of its saved weights, its
objective's loss and metrics on a few batches, and its CPU latency per token."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def saved_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes (the size of the weights on disk)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def evaluate(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> dict[str, float]:
    """The objective's ``loss`` and metrics averaged over prepared ``batches``, weighted by
    their examples; the model is run as it is (call ``eval()`` first)."""
    objective = model.objective
    totals: dict[str, float] = {}
    examples = 0
    with torch.inference_mode():
        for batch in batches:
            out = model(batch)
            weight = objective.examples_in(batch)
            examples += weight
            for name, value in {"loss": out.loss, **out.metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * weight
    return {name: total / max(examples, 1) for name, total in totals.items()}


def cpu_latency_per_token(model: nn.Module, batches: Sequence[dict[str, Tensor]], *, repeats: int = 1) -> float:
    """Seconds per token of a forward pass over ``batches`` on the CPU (after one warm-up
    batch), with the threads torch uses now; tokens as the objective counts them."""
    objective = model.objective
    with torch.inference_mode():
        model(batches[0])
        tokens = 0
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                model(batch)
                tokens += objective.tokens_in(batch)
        elapsed = time.perf_counter() - start
    return elapsed / max(tokens, 1)


def to_cpu(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in batch.items()}
