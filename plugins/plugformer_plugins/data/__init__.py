"""Built-in data tasks."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

#: Registered lazily from the manifest (:mod:`plugformer_plugins.manifest`).
TARGETS = tuple(f"{__name__}.{module}:COMPONENT" for module in ("mqar", "listops", "text", "algorithmic", "pairs", "retro_text"))


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)
