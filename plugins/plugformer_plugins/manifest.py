"""The built-in components' listing data, kept in ``components.json`` so that they can be
registered as :class:`plugformer.LazyComponent` entries: ``plugformer plugins`` and a config
error then start without importing the component modules (and with them torch).

Each kind's subpackage names its components as *targets*, ``"<module>:<attribute>"``, where
the attribute is a :class:`plugformer.Component` or a function of the plugin's registry view
returning one (the ``moe`` ffn). A target is registered lazily when the manifest has it and
its module's file still has the digest recorded there; otherwise (a new or edited module) the
module is imported and the component added at once, so an out-of-date manifest costs start-up
time, never correctness. tests/test_lazy_components.py fails while the manifest is out of
date; rewrite it with::

    python -m plugformer_plugins.manifest
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import pkgutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from plugformer import Capabilities, Component, LazyComponent, RegistryView

MANIFEST = Path(__file__).with_name("components.json")


def register(registry: RegistryView, targets: Iterable[str]) -> None:
    """Register the component of each target (see the module's docstring) in ``registry``."""
    manifest = _manifest()
    for target in targets:
        entry = manifest.get(target)
        if entry is None or entry["digest"] != digest(target):
            component = load(target, registry)
            if component is not None:
                registry.add(component)
            continue
        listed = entry["component"]
        if listed is None:  # a module without components (a shared helper)
            continue
        registry.add(
            LazyComponent(
                kind=listed["kind"],
                name=listed["name"],
                load=functools.partial(_load_component, target, registry),
                summary=listed["summary"],
                reference=listed["reference"],
                capabilities=Capabilities(**listed["capabilities"]),
            )
        )


def modules_of(package: str, path: Iterable[str], attribute: str = "COMPONENT") -> list[str]:
    """A target for every module of a package (``pkgutil``, no import), in name order."""
    return [f"{package}.{info.name}:{attribute}" for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name)]


def load(target: str, registry: RegistryView) -> Component | None:
    """Import the target's module and return its component (None: no such attribute)."""
    module, attribute = target.split(":")
    value = getattr(importlib.import_module(module), attribute, None)
    if value is None or isinstance(value, Component):
        return value
    return value(registry)


def _load_component(target: str, registry: RegistryView) -> Component:
    component = load(target, registry)
    if component is None:
        raise AttributeError(f"{target} no longer exists; rewrite the manifest: python -m plugformer_plugins.manifest")
    return component


def digest(target: str) -> str:
    """A digest of the source file of the target's module (found without importing it)."""
    spec = importlib.util.find_spec(target.split(":")[0])
    origin = spec.origin if spec is not None else None
    if origin is None:
        return ""
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]


@functools.cache
def _manifest() -> dict[str, Any]:
    try:
        return json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        return {}


def kind_packages() -> list[str]:
    """The subpackages of ``plugformer_plugins`` that register components through targets."""
    import plugformer_plugins

    names = [f"plugformer_plugins.{info.name}" for info in pkgutil.iter_modules(plugformer_plugins.__path__) if info.ispkg]
    return [name for name in sorted(names) if hasattr(importlib.import_module(name), "TARGETS")]


def build_manifest() -> dict[str, Any]:
    """The manifest as the component modules define it now (imports every one of them)."""
    from plugformer import Provider, Registry

    registry = Registry(store_configs=False)
    view = registry.view(Provider(plugin="plugformer_plugins.manifest", distribution="plugformer", version=""))
    named: dict[str, tuple[str, str] | None] = {}
    registry.start_loading()
    for package in kind_packages():
        for target in importlib.import_module(package).TARGETS:
            component = load(target, view)
            named[target] = None if component is None else (component.kind, component.name)
            if component is not None:
                view.add(component)
    registry.finish_loading()
    manifest: dict[str, Any] = {}
    for target, key in sorted(named.items()):
        record = None
        if key is not None:
            component = registry.get(*key)
            record = {
                "kind": component.kind,
                "name": component.name,
                "summary": component.summary,
                "reference": component.reference,
                "capabilities": component.capabilities_for().as_dict(),
            }
        manifest[target] = {"digest": digest(target), "component": record}
    return manifest


def main() -> None:
    MANIFEST.write_text(json.dumps(build_manifest(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {MANIFEST}")


if __name__ == "__main__":
    main()
