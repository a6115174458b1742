"""Layer plans: which attention, feed-forward, block (and cross-attention) each layer of
each stack gets, from the component groups and ``model.plan``, checked layer by layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from plugformer.compatibility import Chosen, check_provides, check_requirements, kind_and_group
from plugformer.errors import ConfigError
from plugformer.registry import Registry

#: The slots a plan may vary per layer.
PLANNED_SLOTS = ("attention", "ffn", "block", "cross_attention")


@dataclass(frozen=True)
class LayerSpec:
    """The components of one layer (``cross_attention`` only in a decoder of an
    encoder–decoder)."""

    stack: str
    index: int
    attention: Chosen
    ffn: Chosen
    block: Chosen
    cross_attention: Chosen | None = None

    def slots(self) -> dict[str, Chosen]:
        slots = {"attention": self.attention, "ffn": self.ffn, "block": self.block}
        if self.cross_attention is not None:
            slots["cross_attention"] = self.cross_attention
        return slots

    def describe(self) -> dict[str, str]:
        return {slot: chosen.name for slot, chosen in self.slots().items()}

    @property
    def uses_positions(self) -> bool:
        """False when the attention slot holds a component that orders tokens by itself
        (``ignores_positions``, e.g. a short convolution): the position component's terms
        and requirements then skip this layer."""
        return "ignores_positions" not in self.attention.provides()


@dataclass(frozen=True)
class ModelPlan:
    """The architecture and every layer of every stack, in order (encoder first)."""

    architecture: str
    stacks: dict[str, list[LayerSpec]]

    def describe(self) -> dict[str, list[dict[str, str]]]:
        """The resolved plan as plain data: stack → one {slot: component name} per layer."""
        return {stack: [layer.describe() for layer in layers] for stack, layers in self.stacks.items()}

    def table(self) -> str:
        """One line per layer, for the console: ``decoder 0  attention=local ffn=mlp block=standard``."""
        return "\n".join(
            f"  {layer.stack} {layer.index:<3d}" + " ".join(f"{slot}={name}" for slot, name in layer.describe().items())
            for layer in self.layers()
        )

    def layers(self) -> list[LayerSpec]:
        return [layer for layers in self.stacks.values() for layer in layers]


def components_in_use(components: dict[str, str], layers: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    """The component of each kind a run really used: ``components`` (kind → the group's
    chosen name) with every slot the layers fill replaced by the names its layers use, in
    layer order, joined by ``+`` (``short_conv+full`` for a hybrid). A plan that gives every
    layer ``linformer`` makes the attention ``linformer``, not the group's default."""
    used: dict[str, list[str]] = {}
    for stack in layers.values():
        for layer in stack:
            for slot, name in layer.items():
                names = used.setdefault(slot, [])
                if name not in names:
                    names.append(name)
    return {**components, **{slot: "+".join(names) for slot, names in used.items()}}


def stack_sizes(model_cfg: DictConfig, architecture: str) -> dict[str, int]:
    """Layers per stack: "decoder" or "encoder" alone, or both for an encoder–decoder."""
    names = {"decoder": ["decoder"], "encoder": ["encoder"], "encoder_decoder": ["encoder", "decoder"]}[architecture]
    sizes = {name: model_cfg.get(f"{name}_layers") or model_cfg.n_layers for name in names}
    for name, size in sizes.items():
        if size < 1:
            raise ConfigError(
                f"The {name} would have {size} layers.",
                expected="at least one layer per stack",
                fix=f"set model.n_layers (or model.{name}_layers) to a positive integer",
            )
    return sizes


def resolve_plan(
    model_cfg: DictConfig,
    architecture: str,
    base: dict[str, Chosen],
    make_chosen: Callable[[str, DictConfig | dict[str, Any] | None, str], Chosen],
) -> ModelPlan:
    """Every layer's components: ``base`` holds the group choices (attention, ffn, block,
    cross_attention); ``model.plan`` patterns and per-layer entries override them.
    ``make_chosen(kind, node, where)`` turns a config node (with ``name``) into a Chosen."""
    plan = model_cfg.get("plan") or {}
    options = plan.get("options") or {}
    overrides = plan.get("layers") or {}
    stacks: dict[str, list[LayerSpec]] = {}
    sizes = stack_sizes(model_cfg, architecture)
    for key, entry in overrides.items():
        unknown_slots = sorted(set(entry or {}) - set(PLANNED_SLOTS))
        if unknown_slots:
            raise ConfigError(
                f"model.plan.layers.{key} sets {', '.join(unknown_slots)}, which a layer does not have.",
                expected=f"slots among {', '.join(PLANNED_SLOTS)}",
                fix=f"write e.g. +model.plan.layers.{key}.attention=<name>",
            )
    used: set[str] = set()
    for stack, size in sizes.items():
        layers = []
        for index in range(size):
            slots: dict[str, Chosen] = {}
            for slot in PLANNED_SLOTS:
                kind = kind_and_group(slot)[0]
                if slot == "cross_attention" and not (architecture == "encoder_decoder" and stack == "decoder"):
                    continue
                node: Any = None
                pattern = list(plan.get(slot) or [])
                if pattern:
                    node = pattern[index % len(pattern)]
                for key in (str(index), f"{stack}.{index}"):
                    entry = overrides.get(key)
                    if entry is not None and entry.get(slot) is not None:
                        node = entry[slot]
                        used.add(key)
                slots[slot] = _choice(slot, kind, node, base, options, make_chosen, f"model.plan, {stack} layer {index}")
            layers.append(LayerSpec(stack=stack, index=index, **slots))
        stacks[stack] = layers
    unknown = [key for key in overrides if key not in used and not _names_layer(key, sizes)]
    if unknown:
        raise ConfigError(
            f"model.plan.layers names layers that do not exist: {', '.join(map(str, unknown))}.",
            expected=f"an index below the layer count ({sizes}), or '<stack>.<index>' with stack one of {list(sizes)}",
            fix="correct the index, or raise model.n_layers",
        )
    return ModelPlan(architecture=architecture, stacks=stacks)


def _names_layer(key: Any, sizes: dict[str, int]) -> bool:
    stack, _, index = str(key).rpartition(".")
    if not index.isdigit():
        return False
    if stack:
        return stack in sizes and int(index) < sizes[stack]
    return any(int(index) < size for size in sizes.values())


def _choice(
    slot: str,
    kind: str,
    node: Any,
    base: dict[str, Chosen],
    options: Any,
    make_chosen: Callable[[str, Any, str], Chosen],
    where: str,
) -> Chosen:
    if node is None:
        return base[slot]
    if isinstance(node, str):
        if node == base[slot].name:
            return base[slot]
        extra = (options.get(kind) or {}).get(node) or {}
        node = {"name": node, **(OmegaConf.to_container(extra) if isinstance(extra, DictConfig) else dict(extra))}
    elif "name" not in node:
        raise ConfigError(
            f"{where}: the {slot} entry {OmegaConf.to_yaml(node).strip()!r} names no component.",
            expected=f"a {kind} name, or a node with name=<{kind} name> and its options",
            fix=f"write e.g. model.plan.layers.<index>.{slot}=<name>",
        )
    return make_chosen(kind, node, where)


def check_plan(plan: ModelPlan, shared: dict[str, Chosen], registry: Registry, objective_name: str) -> None:
    """Check every layer: the usual requirements between its components and the shared ones
    (position, norm, objective, data), the attention mode its stack needs (causal in a
    decoder, bidirectional in an encoder), and cross-attention in an encoder–decoder's
    decoder layers."""
    for layer in plan.layers():
        chosen = {**shared, **layer.slots()}
        if not layer.uses_positions:
            del chosen["position"]
        where = f"layer {layer.index} of the {layer.stack}"
        check_requirements(chosen, registry, where=where)
        mode = "causal" if layer.stack == "decoder" else "bidirectional"
        who = f"the {layer.stack} of objective {objective_name!r}"
        check_provides(chosen, registry, {"attention": frozenset({mode})}, who=who, where=where)
        if layer.cross_attention is not None:
            check_provides(
                chosen,
                registry,
                {"cross_attention": frozenset({"cross_attention", "key_padding_mask"}), "block": frozenset({"cross_attention"})},
                who=who,
                where=where,
            )
