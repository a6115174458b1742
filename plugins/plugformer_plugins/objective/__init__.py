"""Built-in objectives."""

from typing import Any

from plugformer import Registry, hookimpl
from plugformer_plugins.objective import causal_lm, classification, seq2seq


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (causal_lm, classification, seq2seq):
        registry.add(module.COMPONENT)


@hookimpl
def lightning_callbacks(cfg: Any) -> list[Any] | None:
    """seq2seq's decoding metric (it needs the whole model, so it is a callback)."""
    return [seq2seq.GenerationMetric()] if (cfg.get("objective") or {}).get("name") == "seq2seq" else None
