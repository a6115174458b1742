"""Built-in run-level techniques for model compression: ``distill`` (knowledge
distillation from a finished run), ``prune`` (magnitude and structured pruning) and
``quantize`` (dynamic int8 and quantization-aware training). Each is enabled with
``+technique=<name>``; see docs/compression.md.

Every module of this package that defines ``COMPONENT`` is registered; helper modules
(losses, layer recorders, measurements) define none."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from plugformer import hookimpl


@hookimpl
def register_components(registry: Any) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMPONENT"):
            registry.add(module.COMPONENT)



@hookimpl
def lightning_callbacks(cfg: Any) -> list[Any]:
    """Carries the report's setting ``report.latency_batches`` to :func:`run_summary`."""
    from plugformer_plugins.technique.report import DEFAULT_LATENCY_BATCHES, ReportSettings

    options = cfg.get("report") if hasattr(cfg, "get") else None
    count = options.get("latency_batches", DEFAULT_LATENCY_BATCHES) if options is not None else DEFAULT_LATENCY_BATCHES
    return [ReportSettings(int(count))]


@hookimpl
def run_summary(trainer: Any, module: Any) -> dict[str, Any] | None:
    """The per-run report (:mod:`report`) for every run: parameters, non-zero parameters,
    bytes on disk, CPU latency per token over ``report.latency_batches`` validation batches
    (default 2; 0 turns the timing off)."""
    from plugformer_plugins.technique.report import DEFAULT_LATENCY_BATCHES, ReportSettings, run_report

    model = getattr(module, "model", None)
    if model is None:
        return None
    settings = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, ReportSettings)]
    try:
        return run_report(trainer, model, settings[0].latency_batches if settings else DEFAULT_LATENCY_BATCHES)
    except Exception as error:  # noqa: BLE001 - a report must never fail a run that trained
        return {"report/error": f"{type(error).__name__}: {error}"}
