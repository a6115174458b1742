"""Loading installed plugins from the ``plugformer`` entry-point group.

Built-in components arrive exactly like third-party ones. Two environment variables choose
which plugins load, each a comma-separated list of entry-point or distribution names:
``PLUGFORMER_PLUGINS`` (only these) and ``PLUGFORMER_DISABLE_PLUGINS`` (all but these).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from plugformer import hookspecs
from plugformer.errors import PluginError
from plugformer.registry import Provider, Registry

ENTRY_POINT_GROUP = "plugformer"
ALLOW_ENV = "PLUGFORMER_PLUGINS"
BLOCK_ENV = "PLUGFORMER_DISABLE_PLUGINS"


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _selected(provider: Provider) -> bool:
    names = {provider.plugin, provider.distribution}
    allowed = _names_from_env(ALLOW_ENV)
    blocked = _names_from_env(BLOCK_ENV) or set()
    if allowed is not None and not names & allowed:
        return False
    return not names & blocked


def _provider(entry_point: EntryPoint) -> Provider:
    dist = entry_point.dist
    return Provider(
        plugin=entry_point.name,
        distribution=dist.name if dist else "<unknown>",
        version=dist.version if dist else "",
    )


def new_plugin_manager() -> pluggy.PluginManager:
    """An empty plugin manager that knows plugformer's hooks."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


@dataclass
class Plugins:
    """The installed plugins of a session: their hooks and the components they registered."""

    manager: pluggy.PluginManager
    registry: Registry
    providers: dict[str, Provider]

    def run_manager(self, run_plugins: dict[str, Any] | None = None) -> pluggy.PluginManager:
        """A plugin manager for one run: the installed plugins plus the run's own objects
        (enabled techniques), whose hooks fire only in this run."""
        manager = new_plugin_manager()
        for name, plugin in self.manager.list_name_plugin():
            manager.register(plugin, name=name)
        for name, plugin in (run_plugins or {}).items():
            manager.register(plugin, name=f"run:{name}")
        return manager


def load_plugins(extra: dict[str, Any] | None = None) -> Plugins:
    """Load every selected entry point of the ``plugformer`` group and register its components.

    ``extra`` adds plugin objects by name (for tests and embedding). A plugin that fails to
    import or to register raises :class:`PluginError` naming its distribution and how to
    disable it.
    """
    manager = new_plugin_manager()
    providers: dict[str, Provider] = {}
    # plugformer's own plugins first, so a third-party clash is reported against the third party.
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (_provider(ep).distribution != "plugformer", ep.name)):
        provider = _provider(entry_point)
        if not _selected(provider) or entry_point.name in providers:
            continue
        try:
            module = entry_point.load()
        except Exception as error:  # noqa: BLE001 - any import failure is the plugin's
            raise PluginError(
                f"Plugin {provider.plugin!r} from {provider} failed to load: "
                f"{type(error).__name__}: {error}",
                expected=f"its entry point {entry_point.value!r} to import cleanly",
                fix=f"disable it with {BLOCK_ENV}={provider.plugin}, or repair or uninstall "
                f"{provider.distribution}",
            ) from error
        manager.register(module, name=entry_point.name)
        providers[entry_point.name] = provider
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
        providers[name] = Provider(plugin=name, distribution="<in-process>", version="")

    registry = Registry()
    for impl in manager.hook.register_components.get_hookimpls():
        provider = providers[manager.get_name(impl.plugin)]
        with registry.providing(provider):
            try:
                impl.function(registry=registry)
            except PluginError:
                raise
            except Exception as error:  # noqa: BLE001
                raise PluginError(
                    f"Plugin {provider.plugin!r} from {provider} failed to register its "
                    f"components: {type(error).__name__}: {error}",
                    fix=f"disable it with {BLOCK_ENV}={provider.plugin}, or repair or uninstall "
                    f"{provider.distribution}",
                ) from error
    return Plugins(manager=manager, registry=registry, providers=providers)
