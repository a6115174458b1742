"""Built-in block components: how a layer wires attention, cross-attention and feed-forward."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins.block import deepnorm, parallel, reversible, standard


@hookimpl
def register_components(registry: RegistryView) -> None:
    for module in (standard, parallel, deepnorm, reversible):
        registry.add(module.COMPONENT)
