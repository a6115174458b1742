"""Built-in data tasks."""

from plugformer import Registry, hookimpl
from plugformer_plugins.data import algorithmic, listops, mqar, pairs, text


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (mqar, listops, text, algorithmic, pairs):
        registry.add(module.COMPONENT)
