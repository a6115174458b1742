"""Built-in norm components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.norm import layernorm, rmsnorm


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (layernorm, rmsnorm):
        registry.add(module.COMPONENT)
