"""Built-in attention components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.attention import full


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (full,):
        registry.add(module.COMPONENT)
