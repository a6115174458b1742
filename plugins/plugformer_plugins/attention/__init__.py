"""Built-in attention components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.attention import full, linear, local


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (full, local, linear):
        registry.add(module.COMPONENT)
