"""The component registry: every attention, position, norm, ffn, objective, data task and
technique that installed plugins register, with its config, capabilities and provider.

Registering a component also stores its config dataclass in Hydra's ConfigStore under the
component's group, so ``model/attention=local model.attention.window=64`` is composed and
type-checked by Hydra with no YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from plugformer.capabilities import Capabilities
from plugformer.errors import PluginError, UnknownComponentError

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


@dataclass(frozen=True)
class Component:
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

    @property
    def group(self) -> str:
        return CONFIG_GROUPS[self.kind]

    @property
    def qualified_name(self) -> str:
        return f"{self.kind}:{self.name}"


def config_node(component: Component) -> Any:
    """The ConfigStore node: the config dataclass plus a ``name`` field naming the component."""
    if not dataclasses.is_dataclass(component.config):
        raise PluginError(
            f"{component.qualified_name} from {component.provider} has config {component.config!r}, "
            "which is not a dataclass.",
            expected="a @dataclass whose fields are the component's options, all with defaults",
            fix=f"report this to the authors of {component.provider.distribution}, or disable it "
            f"with PLUGFORMER_DISABLE_PLUGINS={component.provider.plugin}",
        )
    named = dataclasses.make_dataclass(
        component.config.__name__,
        [("name", str, dataclasses.field(default=component.name))],
        bases=(component.config,),
    )
    named.__module__ = component.config.__module__
    return named


class Registry:
    """All components of a session, by kind and name."""

    def __init__(self, config_store: ConfigStore | None = None) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self._provider = UNKNOWN_PROVIDER
        self._config_store = config_store if config_store is not None else ConfigStore.instance()

    @contextmanager
    def providing(self, provider: Provider) -> Iterator[None]:
        """Attribute the components added inside the block to ``provider``."""
        previous, self._provider = self._provider, provider
        try:
            yield
        finally:
            self._provider = previous

    def add(self, component: Component) -> Component:
        """Register ``component``; its provider is the plugin being loaded.

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
        self._components[component.kind][component.name] = component
        package = f"techniques.{component.name}" if component.kind == "technique" else None
        node = config_node(component)
        self._config_store.store(group=component.group, name=component.name, node=node, package=package)
        if component.kind == "attention":
            self._config_store.store(group=CROSS_ATTENTION_GROUP, name=component.name, node=node)
        return component

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; an :class:`UnknownComponentError` lists the others."""
        try:
            return self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(
                f"No {kind} component named {name!r} is installed.",
                expected=f"one of: {', '.join(self.names(kind)) or '(none registered)'}",
                fix=f"choose one with {CONFIG_GROUPS.get(kind, kind)}=<name>; `plugformer plugins` lists them all",
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components.get(kind, {}))

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(KINDS)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def __contains__(self, qualified: tuple[str, str]) -> bool:
        kind, name = qualified
        return name in self._components.get(kind, {})

    def __len__(self) -> int:
        return sum(len(named) for named in self._components.values())
