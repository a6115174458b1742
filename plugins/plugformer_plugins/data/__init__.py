"""Built-in data tasks."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins.data import algorithmic, listops, mqar, pairs, text


@hookimpl
def register_components(registry: RegistryView) -> None:
    for module in (mqar, listops, text, algorithmic, pairs):
        registry.add(module.COMPONENT)
