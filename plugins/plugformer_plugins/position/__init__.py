"""Built-in position components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.position import absolute, alibi, rope


@hookimpl
def register_components(registry: Registry) -> None:
    for component in (absolute.NONE, absolute.SINUSOIDAL, absolute.LEARNED, rope.COMPONENT, alibi.COMPONENT):
        registry.add(component)
