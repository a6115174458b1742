"""Built-in feed-forward components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.ffn import glu, mlp


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (mlp, glu):
        registry.add(module.COMPONENT)
