"""Built-in data tasks."""

from plugformer import Registry, hookimpl
from plugformer_plugins.data import mqar


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (mqar,):
        registry.add(module.COMPONENT)
