"""Built-in attention components."""

from plugformer import Registry, hookimpl
from plugformer_plugins.attention import full, linear, local, short_conv, token_shift


@hookimpl
def register_components(registry: Registry) -> None:
    for module in (full, local, linear, short_conv, token_shift):
        registry.add(module.COMPONENT)
