"""From a composed config to components: choose them, check them, build the model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from plugformer.compatibility import Chosen, check_length
from plugformer.components import BuildContext, DataTask
from plugformer.bounds import check_bounds
from plugformer.config import Placement, check_core_config
from plugformer.errors import ConfigError
from plugformer.model.transformer import Block, Transformer, initialize
from plugformer.registry import CONFIG_GROUPS, Component, Registry

MODEL_KINDS = ("attention", "position", "norm", "ffn")


def _config_object(component: Component, node: DictConfig) -> Any:
    """An instance of the component's config dataclass from a config node, typed and
    validated even when the node was read back from YAML (a resumed run)."""
    options = {key: value for key, value in OmegaConf.to_container(node, resolve=True).items() if key != "name"}
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(component.config), options))
    except Exception as error:  # noqa: BLE001 - OmegaConf raises several types
        raise ConfigError(
            f"The {component.kind} config of {component.name!r} is incomplete or invalid: {error}",
            fix=f"set the option with {CONFIG_GROUPS[component.kind].replace('/', '.')}.<option>=<value>",
        ) from None
    path = f"techniques.{component.name}" if component.kind == "technique" else CONFIG_GROUPS[component.kind].replace("/", ".")
    check_bounds(config, path)
    return config


def choose_components(cfg: DictConfig, registry: Registry) -> dict[str, Chosen]:
    """The component and config object of every kind the config selects."""
    check_core_config(cfg)
    nodes = {kind: cfg.model.get(kind) for kind in MODEL_KINDS}
    nodes["objective"] = cfg.get("objective")
    nodes["data"] = cfg.get("data")
    chosen: dict[str, Chosen] = {}
    for kind, node in nodes.items():
        if node is None or "name" not in node:
            raise ConfigError(
                f"No {kind} component is selected.",
                expected=f"{CONFIG_GROUPS[kind]}=<name> in the defaults or on the command line",
                fix=f"add {CONFIG_GROUPS[kind]}=<name>; `plugformer plugins` lists the choices",
            )
        component = registry.get(kind, node.name)
        chosen[kind] = Chosen(component, _config_object(component, node))
    return chosen


def chosen_techniques(cfg: DictConfig, registry: Registry) -> dict[str, Chosen]:
    """The techniques enabled with ``+technique=<name>``, by name."""
    techniques = cfg.get("techniques") or {}
    chosen = {name: registry.get("technique", name) for name in techniques}
    return {name: Chosen(component, _config_object(component, techniques[name])) for name, component in chosen.items()}


def model_is_causal(chosen: dict[str, Chosen]) -> bool:
    """The objective decides: it requires either causal or bidirectional attention."""
    needed = chosen["objective"].component.capabilities_for(chosen["objective"].config).requires
    return "causal" in needed.get("attention", frozenset())


def build_model(cfg: DictConfig, chosen: dict[str, Chosen], data: DataTask) -> Transformer:
    """Assemble the Transformer from the chosen components for ``data`` (already prepared)."""
    check_length(chosen, data.max_length)
    model_cfg = cfg.model
    if model_cfg.d_model % model_cfg.n_heads:
        raise ConfigError(
            f"model.d_model={model_cfg.d_model} is not divisible by model.n_heads={model_cfg.n_heads}.",
            expected="d_model a multiple of n_heads",
            fix="change model.d_model or model.n_heads",
        )
    ctx = BuildContext(
        d_model=model_cfg.d_model,
        n_heads=model_cfg.n_heads,
        n_layers=model_cfg.n_layers,
        dropout=model_cfg.dropout,
        causal=model_is_causal(chosen),
        max_length=data.max_length,
        vocab_size=data.vocab_size,
        num_classes=data.num_classes,
    )

    def make(kind: str, context: BuildContext) -> nn.Module:
        return chosen[kind].component.factory(chosen[kind].config, context)

    token_embedding = nn.Embedding(data.vocab_size, model_cfg.d_model)
    position = make("position", ctx)
    layer_ctx = replace(ctx, position=position)
    blocks = [
        Block(
            attention=make("attention", replace(layer_ctx, layer_index=i)),
            ffn=make("ffn", replace(layer_ctx, layer_index=i)),
            make_norm=lambda: make("norm", ctx),
            placement=Placement(model_cfg.block.placement),
            dropout=model_cfg.dropout,
        )
        for i in range(model_cfg.n_layers)
    ]
    final_norm = nn.Identity() if Placement(model_cfg.block.placement) is Placement.post else make("norm", ctx)
    head_ctx = replace(ctx, token_embedding=token_embedding if model_cfg.tie_embeddings else None)
    model = Transformer(token_embedding, position, blocks, final_norm, make("objective", head_ctx), model_cfg.dropout)
    initialize(model, model_cfg.n_layers)
    return model
