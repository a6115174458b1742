"""Built-in position components."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins.position import absolute, alibi, rope, shaw, t5, xl_relative


@hookimpl
def register_components(registry: RegistryView) -> None:
    for component in (absolute.NONE, absolute.SINUSOIDAL, absolute.LEARNED, rope.COMPONENT, alibi.COMPONENT, shaw.COMPONENT, t5.COMPONENT,
                      xl_relative.COMPONENT):
        registry.add(component)
