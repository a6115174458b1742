"""Built-in run-level techniques for model compression: ``distill`` (knowledge
distillation from a finished run), ``prune`` (magnitude and structured pruning),
``quantize`` (dynamic int8 and quantization-aware training) and ``share`` (ALBERT cross-layer
sharing and factorized embeddings). Each is enabled with
``+technique=<name>``; see docs/compression.md.

The four component modules are registered; the Lightning callbacks live in modules of their
own (``*_callback``, ``report_settings``), imported when a run starts, so that listing plugins
never imports Lightning."""

from __future__ import annotations

from typing import Any

from plugformer import hookimpl


#: Registered lazily from the manifest (:mod:`plugformer_plugins.manifest`).
TARGETS = tuple(f"{__name__}.{module}:COMPONENT" for module in ("distill", "prune", "quantize", "share"))


@hookimpl
def register_components(registry: Any) -> None:
    from plugformer_plugins import manifest

    manifest.register(registry, TARGETS)


@hookimpl
def lightning_callbacks(cfg: Any) -> list[Any]:
    """Carries the report's setting ``report.latency_batches`` to :func:`run_summary`."""
    from plugformer_plugins.technique.report import DEFAULT_LATENCY_BATCHES
    from plugformer_plugins.technique.report_settings import ReportSettings

    options = cfg.get("report") if hasattr(cfg, "get") else None
    count = options.get("latency_batches", DEFAULT_LATENCY_BATCHES) if options is not None else DEFAULT_LATENCY_BATCHES
    return [ReportSettings(int(count))]


@hookimpl
def run_summary(trainer: Any, module: Any) -> dict[str, Any] | None:
    """The per-run report (:mod:`report`) for every run: parameters, non-zero parameters,
    bytes on disk, CPU latency per token over ``report.latency_batches`` validation batches
    (default 2; 0 turns the timing off)."""
    from plugformer_plugins.technique.report import DEFAULT_LATENCY_BATCHES, run_report
    from plugformer_plugins.technique.report_settings import ReportSettings

    model = getattr(module, "model", None)
    if model is None:
        return None
    settings = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, ReportSettings)]
    try:
        return run_report(trainer, model, settings[0].latency_batches if settings else DEFAULT_LATENCY_BATCHES)
    except Exception as error:  # noqa: BLE001 - a report must never fail a run that trained
        return {"report/error": f"{type(error).__name__}: {error}"}
