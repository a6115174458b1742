"""Loading installed plugins from the ``plugformer`` entry-point group.

Built-in components arrive exactly like third-party ones. Two environment variables choose
which plugins load, each a comma-separated list of entry-point or distribution names:
``PLUGFORMER_PLUGINS`` (only these) and ``PLUGFORMER_DISABLE_PLUGINS`` (all but these).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from plugformer import hookspecs
from plugformer.errors import PlugformerError, PluginError
from plugformer.registry import Component, Provider, Registry

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


#: Who provides each plugin object of a manager, by the name it is registered under.
_PROVIDERS: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, Provider]] = weakref.WeakKeyDictionary()
CORE_PROVIDER = Provider(plugin="<core>", distribution="plugformer", version="")


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
        from plugformer.training.nonfinite import NonFinitePlugin

        manager = new_plugin_manager()
        providers = dict(self.providers)
        # Core features that take part through the hooks, like any plugin (pytest-style).
        manager.register(NonFinitePlugin(), name="core:nonfinite")
        providers["core:nonfinite"] = CORE_PROVIDER
        for name, plugin in self.manager.list_name_plugin():
            manager.register(plugin, name=name)
        for name, plugin in (run_plugins or {}).items():
            manager.register(plugin, name=f"run:{name}")
            known = ("technique", name) in self.registry
            providers[f"run:{name}"] = self.registry.get("technique", name).provider if known else Provider(name, "<in-process>", "")
        _PROVIDERS[manager] = providers
        return manager


def _disable_hint(provider: Provider, plugin_name: str) -> str:
    technique = plugin_name[4:] if plugin_name.startswith("run:") else None
    hint = f"disable it with {BLOCK_ENV}={provider.plugin}, or repair or uninstall {provider.distribution}"
    if technique:
        hint = f"leave out +technique={technique}, or " + hint
    return hint


def _who(provider: Provider, plugin_name: str) -> str:
    if plugin_name.startswith("run:"):
        return f"Technique {plugin_name[4:]!r} of plugin {provider.plugin!r} ({provider})"
    return f"Plugin {provider.plugin!r} ({provider})".replace(" )", ")")


def call_hook(
    hooks: pluggy.PluginManager,
    name: str,
    *,
    expect: type | tuple[type, ...],
    items: type | tuple[type, ...] | None = None,
    **kwargs: Any,
) -> list[tuple[str, Any]]:
    """Call each implementation of hook ``name`` separately, in pluggy's order, and return
    ``(plugin name, result)`` for every result that is not None.

    A result must be an instance of ``expect`` (and, for a dict or list, hold values or
    elements of type ``items``). An implementation that raises, or returns anything else,
    stops with a :class:`PluginError` naming the plugin, its distribution and
    ``PLUGFORMER_DISABLE_PLUGINS=<name>``; the original exception is its ``__cause__``. A
    :class:`PlugformerError` a plugin raises on purpose (a rejected config) passes unchanged.
    """
    providers = _PROVIDERS.get(hooks, {})
    results: list[tuple[str, Any]] = []
    # pluggy calls the last registered first (tryfirst/trylast respected): the same order.
    for impl in reversed(getattr(hooks.hook, name).get_hookimpls()):
        plugin_name = impl.plugin_name
        provider = providers.get(plugin_name, Provider(plugin_name, "<unknown>", ""))
        try:
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except PlugformerError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a plugin raises is the plugin's
            raise PluginError(
                f"{_who(provider, plugin_name)} failed in its {name} hook: {type(error).__name__}: {error}",
                fix=_disable_hint(provider, plugin_name),
            ) from error
        if result is None:
            continue
        problem = _type_problem(result, expect, items)
        if problem:
            raise PluginError(
                f"{_who(provider, plugin_name)} returned {problem} from its {name} hook.",
                expected=f"{_names(expect)}{f' of {_names(items)}' if items else ''} or None (see docs/plugins.md)",
                fix=_disable_hint(provider, plugin_name),
            )
        results.append((plugin_name, result))
    return results


def _names(types: type | tuple[type, ...] | None) -> str:
    options = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in options if t is not None)


def _type_problem(result: Any, expect: type | tuple[type, ...], items: type | tuple[type, ...] | None) -> str | None:
    if not isinstance(result, expect):
        return f"a {type(result).__name__} ({str(result)[:80]!r})"
    if items is None:
        return None
    values = result.items() if isinstance(result, dict) else enumerate(result)
    for key, value in values:
        if not isinstance(value, items):
            return f"{'an entry' if isinstance(result, dict) else 'an element'} {key!r} of type {type(value).__name__}"
    return None


def blame_component(error: BaseException, registry: Registry) -> PluginError | None:
    """A :class:`PluginError` naming the component (and its plugin) in whose code ``error``
    was raised, found from the innermost frame of its traceback that lies in a module of a
    registered component; None when no component's code is on the traceback, or when the
    error already is a user error."""
    if isinstance(error, PlugformerError) or not isinstance(error, Exception):
        return None
    # Only loaded components can have run: a lazy entry's code was never imported.
    modules = {c.factory.__module__: c for c in registry.entries() if isinstance(c, Component)}
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        component = modules.get(frame.f_globals.get("__name__", ""))
        if component is None:
            continue
        provider = component.provider
        return PluginError(
            f"The {component.kind} component {component.name!r} of plugin {provider.plugin!r} ({provider}) failed: "
            f"{type(error).__name__}: {error}",
            expected=f"its code (in {frame.f_code.co_filename}, line {frame.f_lineno}) to run without errors",
            fix=f"choose another {component.kind}, or disable the plugin with {BLOCK_ENV}={provider.plugin}, "
            f"or repair or uninstall {provider.distribution}",
        )
    return None


@contextmanager
def _registering(provider: Provider) -> Iterator[None]:
    """A plugin's failure to register (in ``register_components`` or an ``after_loading``
    callback) as a :class:`PluginError` naming its distribution."""
    try:
        yield
    except PluginError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a plugin raises is the plugin's
        raise PluginError(
            f"Plugin {provider.plugin!r} from {provider} failed to register its "
            f"components: {type(error).__name__}: {error}",
            fix=f"disable it with {BLOCK_ENV}={provider.plugin}, or repair or uninstall "
            f"{provider.distribution}",
        ) from error


def load_plugins(extra: dict[str, Any] | None = None, *, store_configs: bool = True) -> Plugins:
    """Load every selected entry point of the ``plugformer`` group and register its components
    (and, unless ``store_configs`` is False, their config groups in Hydra's ConfigStore).

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

    registry = Registry(store_configs=store_configs)
    registry.start_loading()
    for impl in manager.hook.register_components.get_hookimpls():
        provider = providers[manager.get_name(impl.plugin)]
        with _registering(provider):
            impl.function(registry=registry.view(provider))
    registry.finish_loading(guard=_registering)
    _PROVIDERS[manager] = providers
    return Plugins(manager=manager, registry=registry, providers=providers)
