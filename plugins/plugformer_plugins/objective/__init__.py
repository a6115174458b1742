"""Built-in objectives."""

from plugformer import Registry, hookimpl
from plugformer_plugins.objective import causal_lm, classification


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (causal_lm, classification):
        registry.add(module.COMPONENT)
