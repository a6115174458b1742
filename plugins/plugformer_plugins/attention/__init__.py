"""Built-in attention components (and sequence mixers that fill the attention slot).

Every module of this package that defines ``COMPONENT`` is registered, so a new attention
is one new file; modules without it (shared helpers such as ``sequence_mixer``) are skipped."""

import importlib
import pkgutil

from plugformer import RegistryView, hookimpl


@hookimpl
def register_components(registry: RegistryView) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMPONENT"):
            registry.add(module.COMPONENT)
