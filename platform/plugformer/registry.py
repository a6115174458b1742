"""The component registry: every attention, position, norm, ffn, objective, data task and
technique that installed plugins register, with its config, capabilities and provider.

Registering a component also stores its config dataclass in Hydra's ConfigStore under the
component's group, so ``model/attention=local model.attention.window=64`` is composed and
type-checked by Hydra with no YAML.

A plugin may announce a component by its listing data only (:class:`LazyComponent`): its
module, and with it torch, is imported the first time the component is looked up, built or
composed, so ``plugformer plugins`` and a config error start without importing it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plugformer.capabilities import Capabilities
from plugformer.errors import PluginError, UnknownComponentError

if TYPE_CHECKING:
    from hydra.core.config_store import ConfigStore

KINDS = ("attention", "position", "norm", "ffn", "block", "objective", "data", "technique")

#: Hydra config group of each kind; the chosen component's config lands at the group's path
#: with "/" as "." (``model.attention``). Techniques are chosen several at a time and each
#: lands under ``techniques.<name>``. Attention components are also stored under
#: :data:`CROSS_ATTENTION_GROUP`, the cross-attention of encoder–decoder models.
CONFIG_GROUPS = {
    "attention": "model/attention",
    "position": "model/position",
    "norm": "model/norm",
    "ffn": "model/ffn",
    "block": "model/block",
    "objective": "objective",
    "data": "data",
    "technique": "technique",
}

CROSS_ATTENTION_GROUP = "model/cross_attention"


@dataclass(frozen=True)
class Provider:
    """Where a component comes from: the plugin (entry-point name) and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


UNKNOWN_PROVIDER = Provider(plugin="<direct>", distribution="<unregistered>", version="")


class _Named:
    """The config group and the ``kind:name`` of a component (loaded or announced)."""

    kind: str
    name: str

    @property
    def group(self) -> str:
        return CONFIG_GROUPS[self.kind]

    @property
    def qualified_name(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Component(_Named):
    """One registered component.

    ``factory`` builds the component: ``factory(config, context)``, where the context is a
    :class:`plugformer.BuildContext` for model parts, a :class:`plugformer.DataContext` for
    data tasks and a :class:`plugformer.TechniqueContext` for techniques; a block's factory
    also receives its built sublayers, ``factory(config, context, parts)``. ``config`` is a dataclass whose fields
    are the component's options (all with defaults). ``capabilities`` is a
    :class:`Capabilities` or a function of the config returning one (for a maximum length
    that depends on an option).
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type
    summary: str
    reference: str = ""
    capabilities: Capabilities | Callable[[Any], Capabilities] = field(default_factory=Capabilities)
    provider: Provider = UNKNOWN_PROVIDER

    def capabilities_for(self, config: Any = None) -> Capabilities:
        """The capabilities under ``config`` (defaults when None)."""
        if isinstance(self.capabilities, Capabilities):
            return self.capabilities
        return self.capabilities(config if config is not None else self.config())


@dataclass(frozen=True)
class LazyComponent(_Named):
    """A component announced by its listing data, loaded only when it is needed.

    ``load()`` returns the :class:`Component` (importing its module); the registry calls it the
    first time the component is looked up (:meth:`Registry.get`, :meth:`Registry.components`),
    which building a model or composing a config that chooses it does. Until then
    ``plugformer plugins`` shows ``summary``, ``reference`` and ``capabilities`` (those under the
    default config) as given here. The loaded component must have the same kind and name; its
    provider is the plugin that added the lazy entry.
    """

    kind: str
    name: str
    load: Callable[[], Component]
    summary: str
    reference: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    provider: Provider = UNKNOWN_PROVIDER

    def capabilities_for(self) -> Capabilities:
        """The capabilities under the default config, as announced."""
        return self.capabilities


#: The field plugformer adds to every component's config node: the chosen component's name
#: (``model.attention.name``). A config dataclass must not define it.
NAME_FIELD = "name"


def config_node(component: Component) -> Any:
    """The ConfigStore node: the config dataclass plus a ``name`` field naming the component.
    Raises :class:`PluginError` when the dataclass is not one or defines ``name`` itself."""
    if not dataclasses.is_dataclass(component.config):
        raise PluginError(
            f"{component.qualified_name} from {component.provider} has config {component.config!r}, "
            "which is not a dataclass.",
            expected="a @dataclass whose fields are the component's options, all with defaults",
            fix=f"report this to the authors of {component.provider.distribution}, or disable it "
            f"with PLUGFORMER_DISABLE_PLUGINS={component.provider.plugin}",
        )
    if any(f.name == NAME_FIELD for f in dataclasses.fields(component.config)):
        raise PluginError(
            f"{component.qualified_name} from {component.provider} has a config field called "
            f"{NAME_FIELD!r} ({component.config.__name__}.{NAME_FIELD}), which clashes with the field plugformer "
            f"adds to every component config: {CONFIG_GROUPS[component.kind].replace('/', '.')}.{NAME_FIELD} "
            "names the chosen component.",
            expected=f"no option called {NAME_FIELD!r} in a component's config dataclass",
            fix=f"rename the option (e.g. {component.name}_{NAME_FIELD} or label) in {component.config.__name__}, "
            f"or disable the plugin with PLUGFORMER_DISABLE_PLUGINS={component.provider.plugin}",
        )
    named = dataclasses.make_dataclass(
        component.config.__name__,
        [(NAME_FIELD, str, dataclasses.field(default=component.name))],
        bases=(component.config,),
    )
    named.__module__ = component.config.__module__
    return named


class Registry:
    """All components of a session, by kind and name.

    While plugins load (:meth:`start_loading` … :meth:`finish_loading`) each plugin gets a
    :class:`RegistryView` of it, which can add components but not look any up, so no plugin
    can depend on the order plugins load in."""

    def __init__(self, config_store: ConfigStore | None = None, *, store_configs: bool = True) -> None:
        """``store_configs=False``: keep the components only, without Hydra's ConfigStore (for
        listings such as ``plugformer plugins``, which need no config groups and start faster
        without importing Hydra)."""
        self._components: dict[str, dict[str, Component | LazyComponent]] = {kind: {} for kind in KINDS}
        self._provider = UNKNOWN_PROVIDER
        if config_store is None and store_configs:
            from hydra.core.config_store import ConfigStore

            config_store = ConfigStore.instance()
        self._config_store = config_store
        self.loading = False
        self._after_loading: list[tuple[RegistryView, Callable[[RegistryView], None]]] = []

    def view(self, provider: Provider) -> RegistryView:
        """The narrow view a plugin's ``register_components`` receives, adding as ``provider``."""
        return RegistryView(self, provider)

    def start_loading(self) -> None:
        """Plugins are about to register: their views refuse lookups until :meth:`finish_loading`."""
        self.loading = True

    def finish_loading(self, guard: Callable[[Provider], AbstractContextManager[Any]] | None = None) -> None:
        """Every plugin has registered: run the callbacks given to
        :meth:`RegistryView.after_loading`, in the order they were given, each inside
        ``guard(provider)`` when given (to name the plugin if it fails). They see every
        component registered by ``register_components`` (and those added by earlier callbacks)."""
        self.loading = False
        pending, self._after_loading = self._after_loading, []
        for view, callback in pending:
            with guard(view.provider) if guard is not None else nullcontext():
                callback(view)

    @contextmanager
    def providing(self, provider: Provider) -> Iterator[None]:
        """Attribute the components added inside the block to ``provider``."""
        previous, self._provider = self._provider, provider
        try:
            yield
        finally:
            self._provider = previous

    def add(self, component: Component | LazyComponent) -> Component | LazyComponent:
        """Register ``component``; its provider is the plugin being loaded. A
        :class:`LazyComponent` is loaded when first looked up (its config node too).

        Raises :class:`PluginError` for an unknown kind or a name already taken.
        """
        component = dataclasses.replace(component, provider=self._provider)
        if component.kind not in self._components:
            raise PluginError(
                f"Plugin {component.provider.plugin!r} ({component.provider}) registers "
                f"{component.name!r} under the unknown kind {component.kind!r}.",
                expected=f"one of: {', '.join(KINDS)}",
                fix=f"disable it with PLUGFORMER_DISABLE_PLUGINS={component.provider.plugin}",
            )
        taken = self._components[component.kind].get(component.name)
        if taken is not None:
            raise PluginError(
                f"Plugin {component.provider.plugin!r} ({component.provider}) registers "
                f"{component.qualified_name}, a name already registered by plugin "
                f"{taken.provider.plugin!r} ({taken.provider}).",
                expected="one component per kind and name",
                fix=f"disable one of them: PLUGFORMER_DISABLE_PLUGINS={component.provider.plugin} "
                f"(or {taken.provider.plugin}), or uninstall {component.provider.distribution}",
            )
        # A bad config is refused before anything is stored (a lazy one when it is loaded).
        node = config_node(component) if isinstance(component, Component) else None
        self._components[component.kind][component.name] = component
        if self._config_store is None:
            return component
        package = f"techniques.{component.name}" if component.kind == "technique" else None
        groups = [component.group, *([CROSS_ATTENTION_GROUP] if component.kind == "attention" else [])]
        for group in groups:
            if node is not None:
                self._config_store.store(group=group, name=component.name, node=node, package=package if group == component.group else None)
            else:
                _store_lazy_node(self._config_store, self, component, group, package if group == component.group else None)
        return component

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind`` (loading it if it was added lazily); an
        :class:`UnknownComponentError` lists the others."""
        try:
            entry = self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(
                f"No {kind} component named {name!r} is installed.",
                expected=f"one of: {', '.join(self.names(kind)) or '(none registered)'}",
                fix=f"choose one with {CONFIG_GROUPS.get(kind, kind)}=<name>; `plugformer plugins` lists them all",
            ) from None
        return entry if isinstance(entry, Component) else self._load(entry)

    def _load(self, entry: LazyComponent) -> Component:
        """Load a lazy entry once, replacing it with the component it returns."""
        provider = entry.provider
        disable = f"disable it with PLUGFORMER_DISABLE_PLUGINS={provider.plugin}, or repair or uninstall {provider.distribution}"
        try:
            with self.providing(provider):
                loaded = entry.load()
        except PluginError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a plugin's module raises is the plugin's
            raise PluginError(
                f"Plugin {provider.plugin!r} ({provider}) failed to load its component {entry.qualified_name}: "
                f"{type(error).__name__}: {error}",
                expected="the component's module to import cleanly",
                fix=disable,
            ) from error
        if not isinstance(loaded, Component) or (loaded.kind, loaded.name) != (entry.kind, entry.name):
            what = loaded.qualified_name if isinstance(loaded, Component) else f"a {type(loaded).__name__}"
            raise PluginError(
                f"Plugin {provider.plugin!r} ({provider}) announced {entry.qualified_name}, but loading it gave {what}.",
                expected=f"a Component of kind {entry.kind!r} named {entry.name!r}",
                fix=disable,
            )
        component = dataclasses.replace(loaded, provider=provider)
        config_node(component)  # the check an eager component gets when it is added
        self._components[entry.kind][entry.name] = component
        return component

    def names(self, kind: str) -> list[str]:
        return sorted(self._components.get(kind, {}))

    def components(self, kind: str | None = None) -> list[Component]:
        """Every component (of ``kind``), sorted by kind and name; lazy ones are loaded."""
        kinds = [kind] if kind else list(KINDS)
        return [self.get(k, n) for k in kinds for n in sorted(self._components[k])]

    def entries(self, kind: str | None = None) -> list[Component | LazyComponent]:
        """Like :meth:`components`, but lazy entries stay unloaded: what a listing shows."""
        kinds = [kind] if kind else list(KINDS)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def __contains__(self, qualified: tuple[str, str]) -> bool:
        kind, name = qualified
        return name in self._components.get(kind, {})

    def __len__(self) -> int:
        return sum(len(named) for named in self._components.values())


class RegistryView:
    """What ``register_components(registry)`` receives: the session's :class:`Registry` seen
    by one plugin.

    - :meth:`add` registers a component with the plugin as its provider;
    - :meth:`get`, :meth:`names`, :meth:`components` and ``in`` read the whole registry, but
      only once every plugin has registered: called from ``register_components`` itself they
      raise :class:`PluginError`, because what they would see depends on the load order.
      Resolve other components lazily instead — in a factory or a capabilities function
      that closes over the view (the ``moe`` ffn builds its experts this way) — or register
      what depends on them in a callback given to :meth:`after_loading`.
    """

    def __init__(self, registry: Registry, provider: Provider) -> None:
        self._registry = registry
        self.provider = provider

    def add(self, component: Component | LazyComponent) -> Component | LazyComponent:
        """Register ``component`` (see :meth:`Registry.add`); its provider is this plugin. A
        :class:`LazyComponent` is loaded only when the component is first needed."""
        with self._registry.providing(self.provider):
            return self._registry.add(component)

    def after_loading(self, callback: Callable[[RegistryView], None]) -> None:
        """Call ``callback(view)`` once every plugin has registered its components, to add
        components that depend on the others (a wrapper for every attention, say). Called at
        once when loading is already over."""
        if self._registry.loading:
            self._registry._after_loading.append((self, callback))
        else:
            callback(self)

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind`` (see :meth:`Registry.get`)."""
        self._refuse_while_loading(f"get({kind!r}, {name!r})")
        return self._registry.get(kind, name)

    def names(self, kind: str) -> list[str]:
        self._refuse_while_loading(f"names({kind!r})")
        return self._registry.names(kind)

    def components(self, kind: str | None = None) -> list[Component]:
        self._refuse_while_loading("components()")
        return self._registry.components(kind)

    def __contains__(self, qualified: tuple[str, str]) -> bool:
        self._refuse_while_loading(f"{qualified!r} in registry")
        return qualified in self._registry

    def __len__(self) -> int:
        self._refuse_while_loading("len(registry)")
        return len(self._registry)

    def _refuse_while_loading(self, call: str) -> None:
        if not self._registry.loading:
            return
        raise PluginError(
            f"Plugin {self.provider.plugin!r} ({self.provider}) called registry.{call} inside register_components, "
            "while plugins are still loading: what it sees would depend on the order plugins load in.",
            expected="lookups of other components only once every plugin has registered",
            fix="look the component up when it is needed (in your factory or capabilities function), or register "
            "what depends on other components in registry.after_loading(callback); or disable the plugin with "
            f"PLUGFORMER_DISABLE_PLUGINS={self.provider.plugin}",
        )


def _store_lazy_node(store: ConfigStore, registry: Registry, entry: LazyComponent, group: str, package: str | None) -> None:
    """Put a node in Hydra's ConfigStore whose config is made when Hydra first loads it (when
    a composition chooses the component), so the store lists every option without loading any.

    Relies on Hydra 1.3's ConfigStore layout (``repo`` holds ``ConfigNode`` objects by group
    and file name, ``load`` copies the node it returns); tests/test_lazy_components.py checks
    that composing through such a node gives the same config as an eager one."""
    from omegaconf import OmegaConf

    made: list[Any] = []  # shared by the copies Hydra makes of the node

    def node() -> Any:
        if not made:
            made.append(OmegaConf.structured(config_node(registry.get(entry.kind, entry.name))))
        return made[0]

    folder = store.repo
    for part in group.split("/"):
        folder = folder.setdefault(part, {})
    folder[f"{entry.name}.yaml"] = _lazy_config_node_class()(name=f"{entry.name}.yaml", group=group, package=package, make=node)


@functools.cache
def _lazy_config_node_class() -> type:
    """The ConfigNode subclass, made on first use so that this module does not import Hydra."""
    from hydra.core.config_store import ConfigNode

    class LazyConfigNode(ConfigNode):
        """A ConfigNode whose ``node`` is made on first access."""

        def __init__(self, *, name: str, group: str, package: str | None, make: Callable[[], Any]) -> None:
            self.name, self.group, self.package, self.provider = name, group, package, None
            self._make = make

        def __getattr__(self, attribute: str) -> Any:
            if attribute == "node":
                return self._make()
            raise AttributeError(attribute)

    return LazyConfigNode
