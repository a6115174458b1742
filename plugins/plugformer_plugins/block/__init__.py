"""Built-in block components: how a layer wires attention, cross-attention and feed-forward.

Every module of this package that defines ``COMPONENT`` is registered, lazily from the
manifest (:mod:`plugformer_plugins.manifest`)."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

TARGETS = manifest.modules_of(__name__, __path__)


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)
