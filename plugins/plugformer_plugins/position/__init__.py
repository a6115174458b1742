"""Built-in position components."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

#: Registered lazily from the manifest (:mod:`plugformer_plugins.manifest`).
TARGETS = (
    *(f"{__name__}.absolute:{name}" for name in ("NONE", "SINUSOIDAL", "LEARNED")),
    *(f"{__name__}.{module}:COMPONENT" for module in ("rope", "alibi", "shaw", "t5", "xl_relative")),
)


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)
