"""Built-in norm components."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins.norm import layernorm, rmsnorm, scalenorm


@hookimpl
def register_components(registry: RegistryView) -> None:
    for module in (layernorm, rmsnorm, scalenorm):
        registry.add(module.COMPONENT)
