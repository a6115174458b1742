"""The registry: adding, finding, naming providers, and storing configs for Hydra."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from plugformer import Capabilities, Component, PluginError, Provider, Registry, UnknownComponentError


@dataclass
class WidgetConfig:
    width: int = 3
    label: str = "w"


def widget(name: str = "widget", kind: str = "ffn", **kw) -> Component:
    return Component(kind=kind, name=name, factory=lambda config, ctx: None, config=WidgetConfig, summary="A widget.", **kw)


@pytest.fixture
def store() -> ConfigStore:
    return ConfigStore()


def test_add_and_get_records_the_provider(store: ConfigStore) -> None:
    registry = Registry(store)
    provider = Provider(plugin="widgets", distribution="widgets-dist", version="1.2")
    with registry.providing(provider):
        registry.add(widget())
    component = registry.get("ffn", "widget")
    assert component.provider == provider
    assert registry.names("ffn") == ["widget"]
    assert ("ffn", "widget") in registry and len(registry) == 1


def test_unknown_name_lists_the_available_ones(store: ConfigStore) -> None:
    registry = Registry(store)
    registry.add(widget("alpha"))
    registry.add(widget("beta"))
    with pytest.raises(UnknownComponentError) as error:
        registry.get("ffn", "gamma")
    assert "'gamma'" in str(error.value) and "alpha, beta" in str(error.value)


def test_a_taken_name_names_both_providers(store: ConfigStore) -> None:
    registry = Registry(store)
    with registry.providing(Provider("first", "first-dist", "1")):
        registry.add(widget())
    with registry.providing(Provider("second", "second-dist", "2")), pytest.raises(PluginError) as error:
        registry.add(widget())
    message = str(error.value)
    assert "first-dist" in message and "second-dist" in message and "PLUGFORMER_DISABLE_PLUGINS=second" in message


def test_unknown_kind_is_a_plugin_error(store: ConfigStore) -> None:
    with pytest.raises(PluginError, match="unknown kind 'gadget'"):
        Registry(store).add(widget(kind="gadget"))


def test_config_is_stored_typed_under_the_group_with_its_name(store: ConfigStore) -> None:
    Registry(store).add(widget(kind="attention"))
    node = OmegaConf.structured(store.load("model/attention/widget.yaml").node)
    assert node.name == "widget" and node.width == 3
    with pytest.raises(ValidationError):
        node.width = "wide"


def test_techniques_land_under_their_own_key(store: ConfigStore) -> None:
    Registry(store).add(widget(kind="technique", name="prune"))
    assert store.load("technique/prune.yaml").package == "techniques.prune"


def test_config_must_be_a_dataclass(store: ConfigStore) -> None:
    bad = Component(kind="ffn", name="bad", factory=lambda c, x: None, config=dict, summary="bad")
    with pytest.raises(PluginError, match="not a dataclass"):
        Registry(store).add(bad)


def test_capabilities_may_depend_on_the_config() -> None:
    component = widget(capabilities=lambda config: Capabilities(provides={"x"}, max_length=config.width))
    assert component.capabilities_for().max_length == 3
    assert component.capabilities_for(WidgetConfig(width=9)).max_length == 9


def test_capabilities_normalize_and_validate() -> None:
    caps = Capabilities(provides=["a", "b"], requires={"attention": ["c"]}, cost="linear")
    assert caps.provides == frozenset({"a", "b"}) and caps.requires["attention"] == frozenset({"c"})
    with pytest.raises(ValueError):
        Capabilities(cost="cubic")


def test_builtins_are_registered_with_their_provider(registry) -> None:
    for kind in ("attention", "position", "norm", "ffn", "objective", "data"):
        assert registry.components(kind), kind
    full = registry.get("attention", "full")
    assert full.provider.distribution == "plugformer" and full.provider.plugin == "plugformer.attention"
    assert {"none", "sinusoidal", "learned"} <= set(registry.names("position"))
