"""Pruning: unstructured magnitude pruning, over all layers or per layer, on the gradual
schedule of Zhu & Gupta 2017, with masks kept through resume; and structured removal of
attention heads and feed-forward neurons by importance (Michel et al. 2019). See
:mod:`sparsity` and :mod:`structured` for the mechanics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugformer import Component, ConfigError, TechniqueContext, bounds, hookimpl
from plugformer_plugins.technique import sparsity, structured
from plugformer_plugins.technique.layers import stack_blocks

#: Written in the run directory when heads or neurons are removed; read when the run's model
#: is built again (resume, load_run, eval), so it is built at its pruned sizes.
STRUCTURE_FILE = "prune_structure.json"
#: The model with the masks applied (plain weights with zeros), written when training ends.
PRUNED_MODEL_FILE = "pruned_model.pt"


#: ``global``: one magnitude threshold over all pruned layers; ``layer``: each layer reaches
#: the target sparsity on its own.
SCOPES = ("global", "layer")


@dataclass
class PruneConfig:
    """Unstructured: ``sparsity`` (final fraction of zeros in the blocks' linear weights),
    reached from ``initial_sparsity`` at ``start_step`` to ``sparsity`` at ``end_step``
    (default: 3/4 of trainer.max_steps; before max_steps) every ``frequency`` steps. Structured, once at
    ``structured_step`` (default: half of trainer.max_steps): remove the fraction ``heads``
    of all attention heads and ``ffn_neurons`` of all feed-forward neurons, the least
    important over ``importance_batches`` training batches."""

    sparsity: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    initial_sparsity: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    scope: str = "global"
    start_step: int = field(default=0, metadata=bounds(ge=0))
    end_step: int | None = field(default=None, metadata=bounds(ge=0))
    frequency: int = field(default=10, metadata=bounds(ge=1))
    heads: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    ffn_neurons: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    structured_step: int | None = field(default=None, metadata=bounds(ge=0))
    importance_batches: int = field(default=4, metadata=bounds(ge=1))


class Prune:
    """The ``prune`` technique. Logs ``prune/sparsity`` (all pruned layers) and
    ``prune/sparsity/<layer>`` at every validation, and ``prune/heads``/``prune/ffn_neurons``
    (what remains) when structured pruning is on; writes :data:`PRUNED_MODEL_FILE` when
    training ends and reports the final numbers in the run summary."""

    def __init__(self, config: PruneConfig, ctx: TechniqueContext) -> None:
        self.config = config
        self.run_dir = Path(ctx.run_dir)
        max_steps = int(ctx.cfg.trainer.get("max_steps", -1) or -1)
        # By default the last quarter of training recovers at the final sparsity (Zhu & Gupta
        # prune over part of training, then keep training at the final masks).
        self.end_step = config.end_step if config.end_step is not None else max(config.start_step, 3 * max_steps // 4)
        self.structured_step = config.structured_step if config.structured_step is not None else max_steps // 2
        if (config.sparsity > 0 and self.end_step < 0) or (self.structural and self.structured_step < 0):
            raise ConfigError(
                "The prune technique needs to know when to prune, and trainer.max_steps is not set.",
                fix="set trainer.max_steps, or techniques.prune.end_step / techniques.prune.structured_step",
            )
        if config.sparsity > 0 and 0 < max_steps <= self.end_step:
            raise ConfigError(
                f"techniques.prune.end_step={self.end_step} is not before trainer.max_steps={max_steps}: the final "
                "sparsity would never be reached (pruning happens at the start of a step).",
                expected="end_step < trainer.max_steps",
                fix=f"set techniques.prune.end_step to at most {max_steps - 1}",
            )
        if self.structural and 0 < max_steps <= self.structured_step:
            raise ConfigError(
                f"techniques.prune.structured_step={self.structured_step} is not before trainer.max_steps={max_steps}.",
                fix=f"set techniques.prune.structured_step to at most {max_steps - 1}",
            )
        if config.scope not in SCOPES:
            raise ConfigError(f"techniques.prune.scope={config.scope!r} is not a pruning scope.", expected=f"one of {list(SCOPES)}", fix="techniques.prune.scope=global or layer")
        if config.initial_sparsity > config.sparsity:
            raise ConfigError(
                f"techniques.prune.initial_sparsity={config.initial_sparsity} is above sparsity={config.sparsity}.",
                fix="choose initial_sparsity ≤ sparsity",
            )
        if self.structural:
            self._check_position(ctx)
        self.model: nn.Module | None = None
        self.linears: dict[str, nn.Linear] = {}
        self._final_reached = False

    @property
    def structural(self) -> bool:
        return self.config.heads > 0 or self.config.ffn_neurons > 0

    def _check_position(self, ctx: TechniqueContext) -> None:
        if self.config.heads <= 0:
            return
        position = ctx.registry.get("position", ctx.cfg.model.position.name)
        per_head = position.capabilities_for().provides & {"score_bias", "relative_terms"}
        if per_head:
            raise ConfigError(
                f"techniques.prune.heads removes attention heads, but position {position.name!r} adds "
                f"per-head score terms ({', '.join(sorted(per_head))}) computed for the configured head count.",
                expected="a position without per-head terms (learned, sinusoidal, rope, none)",
                fix="set techniques.prune.heads=0, or choose another model/position",
            )

    # --- hooks ---------------------------------------------------------------------------------
    @hookimpl
    def model_built(self, model: nn.Module, cfg: Any) -> None:
        self.model = model
        structure = self.run_dir / STRUCTURE_FILE
        if structure.is_file():  # an earlier part of this run removed heads or neurons
            apply_structure(model, json.loads(structure.read_text()))
        if self.structural:
            self._check_structured_layers(model)
        self.linears = sparsity.prunable_linears(model)
        if self.config.sparsity > 0:
            sparsity.add_masks(self.linears)

    @hookimpl
    def lightning_callbacks(self, cfg: Any) -> list[Any]:
        from plugformer_plugins.technique.prune_callback import PruningCallback  # imports Lightning

        return [PruningCallback(self)]

    @hookimpl
    def run_summary(self, trainer: Any, module: Any) -> dict[str, Any] | None:
        if self.model is None:
            return None
        summary: dict[str, Any] = self.measure()
        total = sum(p.numel() for p in self.model.parameters())
        zeros = sum(int((m.weight_mask == 0).sum()) for m in self.linears.values() if hasattr(m, "weight_mask"))
        summary["prune/params"] = total
        summary["prune/nonzero_params"] = total - zeros
        return summary

    # --- what the callback calls ------------------------------------------------------------
    def measure(self) -> dict[str, Any]:
        """``prune/sparsity`` overall, per layer, and the heads and neurons that remain."""
        result: dict[str, Any] = {}
        if self.config.sparsity > 0:
            result["prune/sparsity"] = sparsity.overall_sparsity(self.linears)
            for name, value in sparsity.sparsity_by_layer(self.linears).items():
                result[f"prune/sparsity/{name}"] = value
        if self.structural and self.model is not None:
            result["prune/heads"] = sum(a.n_heads for a in prunable_attentions(self.model).values())
            result["prune/ffn_neurons"] = sum(structured.ffn_width(f) for f in prunable_ffns(self.model).values())
        return result

    def maybe_prune_unstructured(self, step: int) -> bool:
        """Prune to the schedule's target when ``step`` is a pruning step; returns whether it was."""
        c = self.config
        if c.sparsity <= 0 or step < c.start_step or self._final_reached:
            return False
        if step < self.end_step and (step - c.start_step) % c.frequency:
            return False
        target = sparsity.zhu_gupta_sparsity(step, initial=c.initial_sparsity, final=c.sparsity, start=c.start_step, end=self.end_step)
        sparsity.prune_to(self.linears, target, global_scope=c.scope == "global")
        self._final_reached = step >= self.end_step  # from then on the masks stay as they are
        return True

    def remove_structures(self, batches: list[dict[str, Any]], optimizers: list[torch.optim.Optimizer]) -> dict[str, dict[str, int]]:
        """Remove the least important heads and neurons; returns and records the new sizes."""
        assert self.model is not None
        attentions = prunable_attentions(self.model) if self.config.heads > 0 else {}
        ffns = prunable_ffns(self.model) if self.config.ffn_neurons > 0 else {}
        head_scores, neuron_scores = structured.importance(self.model, batches, attentions, ffns)
        if attentions:
            count = round(self.config.heads * sum(a.n_heads for a in attentions.values()))
            for name, keep in structured.least_important(head_scores, count).items():
                structured.keep_heads(attentions[name], keep, optimizers)
        if ffns:
            count = round(self.config.ffn_neurons * sum(structured.ffn_width(f) for f in ffns.values()))
            for name, keep in structured.least_important(neuron_scores, count).items():
                structured.keep_neurons(ffns[name], keep, optimizers)
        sizes = structure_of(self.model)
        from lightning.pytorch.utilities import rank_zero_only  # loaded: called while training

        if rank_zero_only.rank == 0:
            (self.run_dir / STRUCTURE_FILE).write_text(json.dumps(sizes, indent=2))
        return sizes

    def _check_structured_layers(self, model: nn.Module) -> None:
        for what, wanted, found, fix in (
            ("attention heads", self.config.heads, prunable_attentions(model), "model.n_kv_heads unset and an attention of the base class"),
            ("feed-forward neurons", self.config.ffn_neurons, prunable_ffns(model), "model/ffn=mlp or glu"),
        ):
            if wanted > 0 and not found:
                raise ConfigError(
                    f"techniques.prune removes {what}, but no layer of this model has {what} it can remove.",
                    expected=fix,
                    fix=f"set the option to 0 or use {fix}",
                )


def _by_layer(model: nn.Module, part: str, eligible: Any) -> dict[str, nn.Module]:
    """Each layer's ``part`` module that passes ``eligible``, by ``<stack>.<layer>``; a module
    shared by several layers is listed once, under its first layer."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for stack, blocks in stack_blocks(model).items():
        for i, block in enumerate(blocks):
            module = getattr(block, part)
            if id(module) not in seen and eligible(module):
                seen.add(id(module))
                found[f"{stack}.{i}"] = module
    return found


def prunable_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """The self-attentions whose heads can be removed, by ``<stack>.<layer>``."""
    return _by_layer(model, "attention", structured.head_prunable)


def prunable_ffns(model: nn.Module) -> dict[str, nn.Module]:
    """The feed-forward layers whose neurons can be removed, by ``<stack>.<layer>``."""
    return _by_layer(model, "ffn", lambda ffn: structured.ffn_kind(ffn) is not None)


def structure_of(model: nn.Module) -> dict[str, dict[str, int]]:
    """Heads and feed-forward widths per layer (what :func:`apply_structure` restores)."""
    return {
        "heads": {name: a.n_heads for name, a in prunable_attentions(model).items()},
        "ffn_neurons": {name: structured.ffn_width(f) for name, f in prunable_ffns(model).items()},
    }


def apply_structure(model: nn.Module, sizes: dict[str, dict[str, int]]) -> None:
    """Shrink a freshly built model to recorded sizes (which units remain does not matter:
    the checkpoint's weights are loaded next)."""
    attentions, ffns = prunable_attentions(model), prunable_ffns(model)
    for name, heads in sizes.get("heads", {}).items():
        if name in attentions and attentions[name].n_heads != heads:
            structured.keep_heads(attentions[name], torch.arange(heads))
    for name, width in sizes.get("ffn_neurons", {}).items():
        if name in ffns and structured.ffn_width(ffns[name]) != width:
            structured.keep_neurons(ffns[name], torch.arange(width))


COMPONENT = Component(
    kind="technique",
    name="prune",
    factory=Prune,
    config=PruneConfig,
    summary="Magnitude pruning on the Zhu & Gupta schedule (global or per layer); removal of attention heads and FFN neurons by importance.",
    reference="Zhu & Gupta 2017, To prune, or not to prune; Michel et al. 2019, Are Sixteen Heads Really Better than One?",
)
