"""Built-in attention components (and sequence mixers that fill the attention slot).

Every module of this package that defines ``COMPONENT`` is registered, so a new attention
is one new file; modules without it (shared helpers such as ``sequence_mixer``) are skipped.
They are registered lazily from the manifest (:mod:`plugformer_plugins.manifest`)."""

from plugformer import RegistryView, hookimpl
from plugformer_plugins import manifest

TARGETS = manifest.modules_of(__name__, __path__)


@hookimpl
def register_components(registry: RegistryView) -> None:
    manifest.register(registry, TARGETS)
