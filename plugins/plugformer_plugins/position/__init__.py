"""Built-in position components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.position import absolute


@hookimpl
def register_components(registry: Registry) -> None:
    for component in (absolute.NONE, absolute.SINUSOIDAL, absolute.LEARNED):
        registry.add(component)
