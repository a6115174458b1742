"""Built-in run-level techniques for model compression: ``distill`` (knowledge
distillation from a finished run), ``prune`` (magnitude and structured pruning) and
``quantize`` (dynamic int8 and quantization-aware training). Each is enabled with
``+technique=<name>``; see docs/compression.md.

Every module of this package that defines ``COMPONENT`` is registered; helper modules
(losses, layer recorders, measurements) define none."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from plugformer import hookimpl


@hookimpl
def register_components(registry: Any) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMPONENT"):
            registry.add(module.COMPONENT)
