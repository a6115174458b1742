"""From a composed config to components: choose them, plan the layers, check them, build
the model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from plugformer.blocks import BlockParts
from plugformer.compatibility import Chosen, check_length, check_requirements, kind_and_group
from plugformer.components import ARCHITECTURES, BuildContext, DataTask
from plugformer.bounds import check_bounds
from plugformer.config import check_core_config
from plugformer.errors import ConfigError
from plugformer.model.plan import LayerSpec, ModelPlan, check_plan, resolve_plan, stack_sizes
from plugformer.model.transformer import Stack, Transformer, initialize
from plugformer.registry import CONFIG_GROUPS, Component, Registry
from plugformer.provenance import check_providers_installed

#: The model's component slots, chosen by the groups model/<slot>.
MODEL_SLOTS = ("attention", "cross_attention", "position", "norm", "ffn", "block")


def _config_object(component: Component, node: DictConfig | dict[str, Any], path: str | None = None) -> Any:
    """An instance of the component's config dataclass from a config node, typed and
    validated even when the node was read back from YAML (a resumed run)."""
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    options = {key: value for key, value in container.items() if key != "name"}
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(component.config), options))
    except Exception as error:  # noqa: BLE001 - OmegaConf raises several types
        raise ConfigError(
            f"The {component.kind} config of {component.name!r} is incomplete or invalid: {error}",
            fix=f"set the option with {path or CONFIG_GROUPS[component.kind].replace('/', '.')}.<option>=<value>",
        ) from None
    default_path = f"techniques.{component.name}" if component.kind == "technique" else CONFIG_GROUPS[component.kind].replace("/", ".")
    check_bounds(config, path or default_path)  # declared ranges, reported uniformly
    return config


def choose_components(cfg: DictConfig, registry: Registry) -> dict[str, Chosen]:
    """The component and config object the config's groups select, by slot (the model's
    slots, then objective and data; "cross_attention" only for an encoder–decoder). A saved
    run's config (resume, eval, load_run) whose recorded providers are not all installed is
    refused naming the missing distribution (:mod:`plugformer.provenance`)."""
    check_core_config(cfg)
    check_providers_installed(cfg, registry)
    nodes = {slot: cfg.model.get(slot) for slot in MODEL_SLOTS}
    nodes["objective"] = cfg.get("objective")
    nodes["data"] = cfg.get("data")
    chosen: dict[str, Chosen] = {}
    for slot, node in nodes.items():
        kind, group = kind_and_group(slot)
        if node is None or "name" not in node:
            raise ConfigError(
                f"No {slot.replace('_', '-')} component is selected.",
                expected=f"{group}=<name> in the defaults or on the command line",
                fix=f"add {group}=<name>; `plugformer plugins` lists the choices",
            )
        component = registry.get(kind, node.name)
        chosen[slot] = Chosen(component, _config_object(component, node, group.replace("/", ".")))
    if architecture_of(chosen["objective"]) != "encoder_decoder":
        del chosen["cross_attention"]  # only encoder–decoders have one; keep it out of tags and summaries
    return chosen


def chosen_techniques(cfg: DictConfig, registry: Registry) -> dict[str, Chosen]:
    """The techniques enabled with ``+technique=<name>``, by name."""
    techniques = cfg.get("techniques") or {}
    chosen = {name: registry.get("technique", name) for name in techniques}
    return {name: Chosen(component, _config_object(component, techniques[name])) for name, component in chosen.items()}


def architecture_of(objective: Chosen) -> str:
    """The objective decides: it provides "decoder", "encoder" or "encoder_decoder" (an
    objective that names none is a decoder if it requires causal attention)."""
    capabilities = objective.component.capabilities_for(objective.config)
    named = [a for a in ARCHITECTURES if a in capabilities.provides]
    if len(named) > 1:
        raise ConfigError(
            f"objective {objective.name!r} provides several architectures: {named}.",
            expected="exactly one of decoder, encoder, encoder_decoder",
            fix=f"report this to the authors of {objective.component.provider.distribution}",
        )
    if named:
        return named[0]
    return "decoder" if "causal" in capabilities.requires.get("attention", frozenset()) else "encoder"


def plan_model(cfg: DictConfig, chosen: dict[str, Chosen], registry: Registry) -> ModelPlan:
    """Resolve and check the layer plan: every layer's components, before anything is built."""
    architecture = architecture_of(chosen["objective"])

    def make_chosen(kind: str, node: Any, where: str) -> Chosen:
        component = registry.get(kind, node["name"])
        return Chosen(component, _config_object(component, node, f"{where}: model.plan"))

    plan = resolve_plan(cfg.model, architecture, chosen, make_chosen)
    shared = {slot: chosen[slot] for slot in ("position", "norm", "objective", "data")}
    check_plan(plan, shared, registry, chosen["objective"].name)
    return plan


def check_components(cfg: DictConfig, chosen: dict[str, Chosen], registry: Registry) -> ModelPlan:
    """Every check that needs no data: requirements between the group choices (outside a
    model's layers), then the layer plan."""
    outside = {slot: c for slot, c in chosen.items() if slot not in ("attention", "cross_attention", "ffn", "block")}
    check_requirements(outside, registry)
    return plan_model(cfg, chosen, registry)


def build_model(cfg: DictConfig, chosen: dict[str, Chosen], data: DataTask, plan: ModelPlan) -> Transformer:
    """Assemble the Transformer of ``plan`` from the chosen components for ``data`` (prepared)."""
    for layer in plan.layers():
        check_length({**layer.slots(), "position": chosen["position"]}, data.max_length)
    model_cfg = cfg.model
    sizes = stack_sizes(model_cfg, plan.architecture)
    vocab_size = model_vocab_size(model_cfg, data.vocab_size)
    base = BuildContext(
        d_model=model_cfg.d_model,
        n_heads=model_cfg.n_heads,
        n_kv_heads=model_cfg.get("n_kv_heads"),
        head_size=model_cfg.get("head_dim"),
        n_layers=model_cfg.n_layers,
        dropout=model_cfg.dropout,
        causal=False,
        max_length=data.max_length,
        vocab_size=vocab_size,
        encoder_layers=sizes.get("encoder", 0),
        decoder_layers=sizes.get("decoder", 0),
        task=dict(data.facts),
    )

    def make(slot: str, context: BuildContext) -> nn.Module:
        return chosen[slot].component.factory(chosen[slot].config, context)

    token_embedding = nn.Embedding(vocab_size, model_cfg.d_model)
    stacks = {}
    for stack, layers in plan.stacks.items():
        ctx = replace(base, stack=stack, n_layers=len(layers), causal=stack == "decoder")
        position = make("position", ctx)
        blocks = [
            _build_block(layer, replace(ctx, layer_index=layer.index, position=position.for_layer(layer.index) if layer.uses_positions else None), lambda: make("norm", ctx))
            for layer in layers
        ]
        final_norm = make("norm", ctx) if blocks[-1].final_norm else nn.Identity()
        stacks[stack] = Stack(stack, position, blocks, final_norm, model_cfg.dropout)
    head_ctx = replace(base, causal=plan.architecture != "encoder", token_embedding=token_embedding if model_cfg.tie_embeddings else None)
    model = Transformer(token_embedding, stacks, make("objective", head_ctx), plan.architecture)
    model.incremental_decoding = all("incremental_decoding" in layer.attention.provides() for layer in plan.stacks.get("decoder", []))
    initialize(model, sum(sizes.values()))
    return model


def model_vocab_size(model_cfg: DictConfig, data_vocab_size: int) -> int:
    """Rows of the token embedding and output head: ``model.vocab_size`` when set (at least
    the data's vocabulary), else the data's."""
    wanted = model_cfg.get("vocab_size")
    if wanted is None:
        return int(data_vocab_size)
    if int(wanted) < int(data_vocab_size):
        raise ConfigError(
            f"model.vocab_size={wanted} is smaller than the data's vocabulary of {data_vocab_size} ids.",
            expected=f"model.vocab_size >= {data_vocab_size}, or null (the data's vocabulary)",
            fix=f"set model.vocab_size={data_vocab_size} or more, or remove it",
        )
    return int(wanted)


def _build_block(layer: LayerSpec, ctx: BuildContext, make_norm: Any) -> nn.Module:
    def build(chosen: Chosen, context: BuildContext) -> nn.Module:
        return chosen.component.factory(chosen.config, context)

    cross = None
    if layer.cross_attention is not None:
        cross = build(layer.cross_attention, replace(ctx, cross=True, causal=False, position=None))
    parts = BlockParts(attention=build(layer.attention, ctx), ffn=build(layer.ffn, ctx), make_norm=make_norm, cross_attention=cross)
    return layer.block.component.factory(layer.block.config, ctx, parts)
