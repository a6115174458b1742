"""What a plugin author relies on besides the kit: typed hook specifications, a registry
view that makes load order irrelevant, warnings for misspelled capability flags, and a clear
refusal of a config field called ``name``."""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore

import plugformer
from plugformer import Capabilities, Component, PluginError, Provider, Registry, RegistryView, hookimpl
from plugformer.capabilities import CapabilityFlagWarning, likely_misspellings
from plugformer.plugins import load_plugins


@dataclass
class WidgetConfig:
    width: int = 3


def widget(name: str, kind: str = "ffn", config: type = WidgetConfig, **kw: typing.Any) -> Component:
    return Component(kind=kind, name=name, factory=lambda config, ctx: None, config=config, summary="A widget.", **kw)


# --- typed hook specifications ---------------------------------------------------------------


def test_every_hook_argument_is_typed_and_none_is_any() -> None:
    import lightning.pytorch as pl
    from omegaconf import DictConfig
    from torch import Tensor

    from plugformer import hookspecs
    from plugformer.components import ObjectiveOutput
    from plugformer.model.transformer import Transformer
    from plugformer.training.module import TrainingModule

    names = {"register_components", "validate_config", "model_built", "extra_losses", "lightning_callbacks", "run_summary", "tracking_tags"}
    namespace = {**vars(hookspecs), "pl": pl, "DictConfig": DictConfig, "Tensor": Tensor, "ObjectiveOutput": ObjectiveOutput,
                 "Transformer": Transformer, "Registry": Registry, "RegistryView": RegistryView, "TrainingModule": TrainingModule}
    for name in names:
        hints = typing.get_type_hints(getattr(hookspecs, name), namespace)
        arguments = {k: v for k, v in hints.items() if k != "return"}
        assert arguments and all(v is not typing.Any for v in arguments.values()), (name, hints)
    assert typing.get_type_hints(hookspecs.register_components, namespace)["registry"] is RegistryView
    assert typing.get_type_hints(hookspecs.model_built, namespace)["model"] is Transformer
    assert typing.get_args(typing.get_type_hints(hookspecs.extra_losses, namespace)["stage"]) == ("train", "val", "test")


def test_the_hook_argument_types_are_imported_only_for_type_checkers() -> None:
    from plugformer import hookspecs

    # Nothing heavy (Lightning, the model, the training module) at import time: plugins
    # import hookimpl from here.
    assert not {"pl", "DictConfig", "Tensor", "Transformer", "TrainingModule", "ObjectiveOutput"} & set(vars(hookspecs))


# --- load order ------------------------------------------------------------------------------


class WrapsEveryFfn:
    """Registers ``gated_<name>`` for every ffn, whichever plugins register them and in
    whatever order they load: the wrappers are added once loading is over."""

    @hookimpl
    def register_components(self, registry: RegistryView) -> None:
        def wrap_all(view: RegistryView) -> None:
            for inner in view.components("ffn"):
                if not inner.name.startswith("gated_"):
                    view.add(widget(f"gated_{inner.name}"))

        registry.after_loading(wrap_all)


class LateFfn:
    @hookimpl
    def register_components(self, registry: RegistryView) -> None:
        registry.add(widget("late_ffn"))


class EagerLookup:
    @hookimpl
    def register_components(self, registry: RegistryView) -> None:
        registry.get("ffn", "mlp")  # depends on what happened to load before


@pytest.mark.parametrize("order", [("wrap", "late"), ("late", "wrap")])
def test_a_wrapping_plugin_sees_every_component_whatever_the_load_order(order: tuple[str, ...]) -> None:
    plugins = {"wrap": WrapsEveryFfn(), "late": LateFfn()}
    loaded = load_plugins(extra={name: plugins[name] for name in order})
    names = loaded.registry.names("ffn")
    assert "gated_late_ffn" in names and "gated_mlp" in names and "gated_moe" in names
    assert loaded.registry.get("ffn", "gated_late_ffn").provider.plugin == "wrap"  # attributed to the wrapper
    assert loaded.registry.get("ffn", "late_ffn").provider.plugin == "late"


def test_a_lookup_while_plugins_load_is_refused_naming_the_plugin_and_the_fix() -> None:
    with pytest.raises(PluginError) as error:
        load_plugins(extra={"eager": EagerLookup()})
    message = str(error.value)
    assert "'eager'" in message and "get('ffn', 'mlp')" in message and "after_loading" in message
    assert "PLUGFORMER_DISABLE_PLUGINS=eager" in message


def test_the_moe_finds_an_expert_registered_after_it() -> None:
    from plugformer.testing import check_component
    from plugformer_plugins.ffn.moe import MoEConfig

    loaded = load_plugins(extra={"late": LateFfn()})  # built-ins (moe included) load first
    moe = loaded.registry.get("ffn", "moe")
    # Its view resolves the expert lazily: an ffn of a plugin loaded later is found.
    assert moe.capabilities_for(MoEConfig(expert="mlp")) is not None
    with pytest.raises(plugformer.ConfigError, match="late_ffn|expert"):
        moe.capabilities_for(MoEConfig(expert="nope"))
    check_component(moe, MoEConfig(num_experts=2, expert="glu"), allow_zero_grad=["experts.*"])


def test_a_failing_after_loading_callback_names_its_plugin() -> None:
    class Broken:
        @hookimpl
        def register_components(self, registry: RegistryView) -> None:
            registry.after_loading(lambda view: 1 / 0)

    with pytest.raises(PluginError, match=r"Plugin 'broken'.*ZeroDivisionError"):
        load_plugins(extra={"broken": Broken()})


def test_a_view_reads_everything_once_loading_is_over() -> None:
    registry = Registry(ConfigStore())
    view = registry.view(Provider("p", "p-dist", "1"))
    registry.start_loading()
    view.add(widget("a"))
    with pytest.raises(PluginError):
        view.names("ffn")
    registry.finish_loading()
    assert view.names("ffn") == ["a"] and ("ffn", "a") in view and len(view) == 1
    assert view.get("ffn", "a").provider.distribution == "p-dist"


# --- misspelled capability flags -------------------------------------------------------------


def test_a_flag_close_to_a_known_one_warns_with_the_suggestion() -> None:
    with pytest.warns(CapabilityFlagWarning, match="'casual'.*did you mean 'causal'"):
        Capabilities(provides={"casual", "bidirectional"})
    with pytest.warns(CapabilityFlagWarning, match="'key_padding'.*did you mean 'key_padding_mask'"):
        Capabilities(requires={"attention": {"key_padding"}})
    with pytest.warns(CapabilityFlagWarning, match="kind 'attenton'.*did you mean 'attention'"):
        Capabilities(requires={"attenton": {"causal"}})


def test_known_flags_and_new_flags_unlike_any_known_one_pass_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Capabilities(provides={"causal", "bidirectional", "key_padding_mask", "global_tokens"}, requires={"data": {"mask_token"}})
    assert likely_misspellings({"qk_transfrom", "causal", "hash_buckets"}) == {"qk_transfrom": "qk_transform"}


def test_no_registered_component_uses_a_flag_that_looks_misspelled() -> None:
    registry = load_plugins().registry
    for component in registry.components():
        capabilities = component.capabilities_for()
        flags = set(capabilities.provides).union(*capabilities.requires.values())
        assert not likely_misspellings(flags), component.qualified_name


# --- a config field called `name` ------------------------------------------------------------


@dataclass
class NamedConfig:
    name: str = "mine"
    width: int = 3


def test_a_config_field_called_name_is_refused_at_registration() -> None:
    registry = Registry(ConfigStore())
    with registry.providing(Provider("named", "named-dist", "0.1")), pytest.raises(PluginError) as error:
        registry.add(widget("named", kind="attention", config=NamedConfig))
    message = str(error.value)
    assert "NamedConfig.name" in message and "model.attention.name" in message
    assert "named-dist" in message and "rename" in message and "PLUGFORMER_DISABLE_PLUGINS=named" in message
    assert ("attention", "named") not in registry


def test_a_plugin_with_such_a_config_stops_loading_with_that_message() -> None:
    class Named:
        @hookimpl
        def register_components(self, registry: RegistryView) -> None:
            registry.add(widget("named", config=NamedConfig))

    with pytest.raises(PluginError, match="config field called 'name'"):
        load_plugins(extra={"named": Named()})


# --- the docs' example plugin ----------------------------------------------------------------


def test_the_docs_example_plugin_defines_the_component_testing_md_imports_and_conforms(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/plugins.md's plugformer_cosine, saved as a package, passes docs/testing.md's tests."""
    import sys
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    plugin_code = (docs / "plugins.md").read_text().split("# plugformer_cosine/__init__.py\n", 1)[1].split("```", 1)[0]
    test_code = (docs / "testing.md").read_text().split("# tests/test_conformance.py of your plugin\n", 1)[1].split("```", 1)[0]
    (tmp_path / "plugformer_cosine").mkdir()
    (tmp_path / "plugformer_cosine" / "__init__.py").write_text(plugin_code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        namespace: dict[str, typing.Any] = {}
        exec(compile(test_code, "docs/testing.md", "exec"), namespace)
        namespace["test_cosine_attention_conforms"]()
        for temperature in (1.0, 20.0):
            namespace["test_cosine_attention_conforms_with_options"](temperature)
        assert namespace["COMPONENT"].name == "cosine"
    finally:
        sys.modules.pop("plugformer_cosine", None)
