"""Built-in feed-forward components, and the expert metrics of mixture-of-experts layers."""

from typing import Any

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

#: Registered lazily from the manifest (:mod:`plugformer_plugins.manifest`); the moe's
#: ``make_component(registry)`` builds its experts from any ffn of the registry.
TARGETS = (f"{__name__}.mlp:COMPONENT", f"{__name__}.glu:COMPONENT", f"{__name__}.moe:make_component")


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)


@hookimpl
def lightning_callbacks(cfg: Any) -> list[Any] | None:
    """The expert metrics (``val/moe/...``, see :mod:`moe_metrics`) when the model config
    names the moe ffn anywhere (``model/ffn=moe``, a layer plan, a single layer)."""
    from omegaconf import OmegaConf

    model = cfg.get("model") if hasattr(cfg, "get") else None
    if OmegaConf.is_config(model):
        model = OmegaConf.to_container(model)
    if not _names_moe(model):
        return None
    from plugformer_plugins.ffn.moe_metrics import ExpertMetrics  # imports Lightning

    return [ExpertMetrics()]


def _names_moe(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_names_moe(value) for value in node.values())
    if isinstance(node, list):
        return any(_names_moe(value) for value in node)
    return node == "moe"
