"""Built-in data tasks."""

from plugformer import Registry, hookimpl
from plugformer_plugins.data import listops, mqar, text


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (mqar, listops, text):
        registry.add(module.COMPONENT)
