"""Lazy components: a plugin may announce a component by its listing data and have its module
(and torch) imported only when the component is looked up, built or composed. The built-ins
do so from ``plugformer_plugins/components.json``, which must match the modules."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from plugformer import Capabilities, Component, LazyComponent, PluginError, Provider, Registry, hookimpl
from plugformer.listing import component_record
from plugformer.plugins import load_plugins
from plugformer_plugins import manifest


@dataclass
class GadgetConfig:
    width: int = 3


GADGET = Component(
    kind="attention", name="gadget", factory=lambda config, ctx: ("built", config.width), config=GadgetConfig,
    summary="A gadget.", reference="Nobody 2026", capabilities=Capabilities(provides={"causal"}, cost="linear"),
)
PROVIDER = Provider(plugin="gadgets", distribution="gadgets-dist", version="2.0")


def lazy(loads: list[str], load=lambda: GADGET, **overrides) -> LazyComponent:
    def counted():
        loads.append("loaded")
        return load()

    fields = dict(kind="attention", name="gadget", summary="A gadget.", reference="Nobody 2026",
                  capabilities=Capabilities(provides={"causal"}, cost="linear"))
    return LazyComponent(load=counted, **{**fields, **overrides})


def test_a_lazy_component_is_listed_unloaded_and_loaded_once_when_looked_up() -> None:
    loads: list[str] = []
    registry = Registry(store_configs=False)
    registry.view(PROVIDER).add(lazy(loads))
    assert registry.names("attention") == ["gadget"] and ("attention", "gadget") in registry and len(registry) == 1
    (entry,) = registry.entries()
    record = component_record(entry)
    assert record["summary"] == "A gadget." and record["capabilities"]["cost"] == "linear"
    assert record["distribution"] == "gadgets-dist" and record["group"] == "model/attention"
    assert loads == []
    component = registry.get("attention", "gadget")
    assert isinstance(component, Component) and component.provider == PROVIDER
    assert component.factory(GadgetConfig(), None) == ("built", 3)
    assert registry.get("attention", "gadget") is component and registry.components() == [component]
    assert loads == ["loaded"]


def test_the_config_node_is_made_when_hydra_loads_it_and_is_typed() -> None:
    loads: list[str] = []
    store = ConfigStore()
    registry = Registry(store)
    registry.view(PROVIDER).add(lazy(loads))
    assert "gadget.yaml" in store.list("model/attention") and "gadget.yaml" in store.list("model/cross_attention")
    assert loads == []
    node = store.load("model/attention/gadget.yaml").node
    assert loads == ["loaded"]
    assert OmegaConf.to_container(node) == {"width": 3, "name": "gadget"}
    with pytest.raises(ValidationError):
        node.width = "wide"
    eager_store = ConfigStore()
    Registry(eager_store).add(GADGET)
    for group in ("model/attention", "model/cross_attention"):
        assert store.load(f"{group}/gadget.yaml").node == eager_store.load(f"{group}/gadget.yaml").node
        assert store.load(f"{group}/gadget.yaml").package == eager_store.load(f"{group}/gadget.yaml").package
    assert loads == ["loaded"]


def test_a_lazy_technique_lands_under_its_own_key() -> None:
    store = ConfigStore()
    technique = Component(kind="technique", name="gizmo", factory=lambda c, x: None, config=GadgetConfig, summary="g")
    Registry(store).add(lazy([], load=lambda: technique, kind="technique", name="gizmo"))
    assert store.load("technique/gizmo.yaml").package == "techniques.gizmo"


def test_a_module_that_fails_to_load_names_the_plugin_and_the_fix() -> None:
    registry = Registry(store_configs=False)

    def broken() -> Component:
        raise ModuleNotFoundError("No module named 'gadget_kernels'")

    registry.view(PROVIDER).add(lazy([], load=broken))
    with pytest.raises(PluginError) as error:
        registry.get("attention", "gadget")
    message = str(error.value)
    assert "'gadgets' (gadgets-dist 2.0)" in message and "attention:gadget" in message and "gadget_kernels" in message
    assert "PLUGFORMER_DISABLE_PLUGINS=gadgets" in message


def test_a_load_that_gives_another_component_is_refused() -> None:
    registry = Registry(store_configs=False)
    registry.view(PROVIDER).add(lazy([], name="other"))
    with pytest.raises(PluginError, match="announced attention:other, but loading it gave attention:gadget"):
        registry.get("attention", "other")


def test_a_plugin_may_mix_lazy_and_eager_components_through_the_same_hook() -> None:
    loads: list[str] = []
    eager = Component(kind="ffn", name="widget", factory=lambda c, x: None, config=GadgetConfig, summary="w")

    class Plugin:
        @hookimpl
        def register_components(self, registry) -> None:
            registry.add(lazy(loads))
            registry.add(eager)

    registry = load_plugins({"gadgets": Plugin()}, store_configs=False).registry
    listed = {(c.kind, c.name): c for c in registry.entries()}
    assert isinstance(listed["attention", "gadget"], LazyComponent) and listed["ffn", "widget"].factory is eager.factory
    assert listed["attention", "gadget"].provider.plugin == "gadgets" and loads == []


def test_the_builtin_manifest_matches_the_component_modules() -> None:
    current = manifest.build_manifest()
    recorded = json.loads(manifest.MANIFEST.read_text())
    stale = sorted(t for t in current.keys() | recorded.keys() if current.get(t) != recorded.get(t))
    assert not stale, (
        f"plugformer_plugins/components.json is out of date for {stale[:5]} (these components are imported eagerly, "
        "torch with them, until it is rewritten): run `python -m plugformer_plugins.manifest` and commit components.json"
    )


def test_a_module_changed_since_the_manifest_is_registered_eagerly(monkeypatch) -> None:
    target = "plugformer_plugins.norm.rmsnorm:COMPONENT"
    entry = json.loads(manifest.MANIFEST.read_text())[target]
    monkeypatch.setattr(manifest, "_manifest", lambda: {target: {**entry, "digest": "0" * 16}})
    registry = Registry(store_configs=False)
    manifest.register(registry.view(PROVIDER), [target])
    (component,) = registry.entries()
    assert isinstance(component, Component) and component.name == "rmsnorm"
    monkeypatch.setattr(manifest, "_manifest", lambda: {target: entry})
    registry = Registry(store_configs=False)
    manifest.register(registry.view(PROVIDER), [target])
    (announced,) = registry.entries()
    assert isinstance(announced, LazyComponent) and registry.get("norm", "rmsnorm").config.__name__ == "RMSNormConfig"
