"""Built-in objectives."""

from typing import Any

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

#: Registered lazily from the manifest (:mod:`plugformer_plugins.manifest`).
TARGETS = tuple(
    f"{__name__}.{module}:COMPONENT" for module in ("causal_lm", "classification", "masked_lm", "seq2seq", "span_corruption")
)


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)


@hookimpl
def lightning_callbacks(cfg: Any) -> list[Any] | None:
    """The decoding metrics of seq2seq and span_corruption (they need the whole model, so they
    are a callback; each objective's generation_metric and bleu options switch them on)."""
    name = (cfg.get("objective") or {}).get("name")
    if name not in ("seq2seq", "span_corruption"):
        return None
    from plugformer_plugins.objective.generation_metric import GenerationMetric  # imports Lightning

    return [GenerationMetric()]
