"""Knowledge distillation from a finished run: softened logits with temperature T and weight
α (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), optional hidden-state
and attention-map losses with a layer mapping (Jiao et al. 2020, "TinyBERT"), and a student
initialised from every k-th teacher layer (Sanh et al. 2019, "DistilBERT")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from plugformer import Component, ConfigError, ObjectiveOutput, TechniqueContext, bounds, hookimpl
from plugformer_plugins.technique.distill_losses import (
    attention_map_loss, logit_distillation, masked_mse, scored_positions, softmax_attention_map,
)
from plugformer_plugins.technique.layers import LayerRecorder, stack_blocks, uniform_layer_map


@dataclass
class DistillConfig:
    """``teacher``: a finished run directory; ``checkpoint``: best, last or a file.
    The optimized loss is (1−α)·task + α·T²·KL(teacher_T ‖ student_T)
    + ``hidden_weight``·MSE(hidden) + ``attention_weight``·MSE(attention maps).
    ``layer_map[i]``: the teacher layer student layer i learns from (default: uniform, the
    last from the last). ``init_from_teacher``: copy teacher layer i·k into student layer i
    (k = ``init_stride``, default teacher layers // student layers) and every other tensor
    whose name and shape match. ``sequence_level`` (encoder–decoders): training steps learn
    the teacher's greedy output instead of the gold target (Kim & Rush 2016)."""

    teacher: str = ""
    checkpoint: str = "best"
    temperature: float = field(default=2.0, metadata=bounds(gt=0.0))
    alpha: float = field(default=0.5, metadata=bounds(ge=0.0, le=1.0))
    hidden_weight: float = field(default=0.0, metadata=bounds(ge=0.0))
    attention_weight: float = field(default=0.0, metadata=bounds(ge=0.0))
    layer_map: list[int] | None = None
    init_from_teacher: bool = False
    init_stride: int | None = field(default=None, metadata=bounds(ge=1))
    sequence_level: bool = False


class Distill:
    """The ``distill`` technique. The teacher is loaded when the run starts, kept frozen with
    :meth:`TechniqueContext.add_frozen` (it follows the device and never enters the optimizer
    or a checkpoint); the hidden-state projection, when widths differ, is trained with
    :meth:`TechniqueContext.add_trainable`. Loss terms (already weighted, logged as
    ``<stage>/loss_<name>``): ``distill_kd`` = α·T²·KL, ``distill_task`` = −α·task loss (so the
    total holds (1−α)·task), ``distill_hidden``, ``distill_attention``."""

    def __init__(self, config: DistillConfig, ctx: TechniqueContext) -> None:
        if not config.teacher:
            raise ConfigError(
                "The distill technique needs a teacher run.",
                expected="techniques.distill.teacher=<run dir of a finished run>",
                fix="train a teacher first, then pass its run directory",
            )
        self.config = config
        self.ctx = ctx
        loaded = ctx.load_run(config.teacher, checkpoint=config.checkpoint)
        self.teacher_cfg = loaded.cfg
        self.facts = dict(loaded.data.facts)
        self.teacher = ctx.add_frozen("distill_teacher", loaded.model)
        self.student: nn.Module | None = None
        self.projection: nn.Module | None = None
        self.layer_maps: dict[str, list[int]] = {}
        self.initialised: dict[str, list[int]] = {}
        self._student_layers: LayerRecorder | None = None
        self._teacher_layers: LayerRecorder | None = None
        student_width, teacher_width = int(ctx.cfg.model.d_model), int(loaded.cfg.model.d_model)
        if config.hidden_weight > 0 and student_width != teacher_width:
            # TinyBERT's W_h: one learned map from the student's width to the teacher's.
            self.projection = ctx.add_trainable("distill_hidden_projection", nn.Linear(student_width, teacher_width, bias=False))

    # --- hooks ---------------------------------------------------------------------------------
    @hookimpl(tryfirst=True)  # initialise before other techniques wrap the layers (masks, fake quantization)
    def model_built(self, model: nn.Module, cfg: Any) -> None:
        self._check_compatible(model, cfg)
        self.student = model
        self.layer_maps = self._layer_maps(model)
        layers = self.config.hidden_weight > 0 or self.config.attention_weight > 0
        if layers:
            self._check_attention_maps(model)
            self._student_layers = LayerRecorder(model, hidden=self.config.hidden_weight > 0, attention_inputs=True)
            self._teacher_layers = LayerRecorder(self.teacher, hidden=self.config.hidden_weight > 0, attention_inputs=True)
        if self.config.init_from_teacher:
            self.initialised = initialise_from_teacher(model, self.teacher, self.config.init_stride)
        if self.config.sequence_level and (model.architecture != "encoder_decoder" or self.facts.get("start_id") is None):
            raise ConfigError(
                "techniques.distill.sequence_level trains on the teacher's generated targets, which needs an "
                f"encoder–decoder with a start token; this model is a {model.architecture}.",
                fix="use an encoder–decoder objective (seq2seq, span_corruption), or unset sequence_level",
            )

    @hookimpl
    def extra_losses(self, model: nn.Module, batch: dict[str, Tensor], outputs: ObjectiveOutput, stage: str) -> dict[str, Tensor] | None:
        if model is not self.student:
            return None
        with torch.no_grad():
            teacher_out = self.teacher(batch)
        terms: dict[str, Tensor] = {}
        alpha = self.config.alpha
        if alpha > 0:
            if outputs.logits is None or teacher_out.logits is None:
                raise ConfigError(
                    "The distill technique needs the objective's logits, and this objective returns none.",
                    fix="set techniques.distill.alpha=0 and use hidden_weight/attention_weight only",
                )
            scored = scored_positions(outputs.logits, batch)
            kd = logit_distillation(outputs.logits, teacher_out.logits, self.config.temperature, scored)
            terms["distill_kd"] = alpha * kd
            terms["distill_task"] = -alpha * outputs.loss
        if self._student_layers is not None:
            terms.update(self._layer_terms())
        if self.config.sequence_level and stage == "train":
            # Kim & Rush 2016: the task part learns the teacher's output, not the gold target.
            student_on_teacher = model(teacher_targets(self.teacher, batch, self.facts))
            terms["distill_sequence"] = (1 - alpha) * student_on_teacher.loss
            terms["distill_task"] = -outputs.loss
        return terms

    @hookimpl
    def run_summary(self, trainer: Any, module: Any) -> dict[str, Any] | None:
        summary: dict[str, Any] = {"distill/teacher": str(self.config.teacher)}
        summary["distill/teacher_params"] = sum(p.numel() for p in self.teacher.parameters())
        for stack, layers in self.layer_maps.items():
            summary[f"distill/layer_map/{stack}"] = layers
        for stack, layers in self.initialised.items():
            summary[f"distill/initialised_from/{stack}"] = layers
        return summary

    # --- layers ----------------------------------------------------------------------------------
    def _layer_terms(self) -> dict[str, Tensor]:
        assert self._student_layers is not None and self._teacher_layers is not None
        student, teacher = self._student_layers, self._teacher_layers
        hidden: list[Tensor] = []
        maps: list[Tensor] = []
        for stack, layer_map in self.layer_maps.items():
            for s_index, t_index in enumerate(layer_map):
                recorded = [(student, s_index), (teacher, t_index)]
                missing = any(
                    i not in r.attention.get(stack, {}) or (self.config.hidden_weight > 0 and i not in r.hidden.get(stack, {}))
                    for r, i in recorded
                )
                if missing:
                    raise ConfigError(
                        f"The distill technique's layer losses need each block's output, but {stack} layer "
                        f"{s_index} of the student (or {t_index} of the teacher) ran outside its forward hooks.",
                        expected="blocks that run through their own forward (not reversible ones)",
                        fix="set techniques.distill.hidden_weight=0 and attention_weight=0, or use another model/block",
                    )
                s_x, s_kwargs = student.attention[stack][s_index]
                mask = s_kwargs.get("mask")
                if self.config.hidden_weight > 0:
                    s_hidden = student.hidden[stack][s_index]
                    if self.projection is not None:
                        s_hidden = self.projection(s_hidden)
                    hidden.append(masked_mse(s_hidden, teacher.hidden[stack][t_index], mask))
                if self.config.attention_weight > 0:
                    s_block, t_block = stack_blocks(self.student)[stack][s_index], stack_blocks(self.teacher)[stack][t_index]
                    t_x, t_kwargs = teacher.attention[stack][t_index]
                    with torch.no_grad():
                        t_map = softmax_attention_map(t_block.attention, t_x, t_kwargs)
                    s_map = softmax_attention_map(s_block.attention, s_x, s_kwargs)
                    maps.append(attention_map_loss(s_map, t_map, mask))
        student.clear()
        teacher.clear()
        terms = {}
        if hidden:
            terms["distill_hidden"] = self.config.hidden_weight * torch.stack(hidden).mean()
        if maps:
            terms["distill_attention"] = self.config.attention_weight * torch.stack(maps).mean()
        return terms

    def _layer_maps(self, model: nn.Module) -> dict[str, list[int]]:
        student, teacher = stack_blocks(model), stack_blocks(self.teacher)
        maps = {stack: uniform_layer_map(len(blocks), len(teacher[stack])) for stack, blocks in student.items()}
        if self.config.layer_map is not None:
            if len(maps) != 1:
                raise ConfigError(
                    "techniques.distill.layer_map applies to a model with one stack; this one has "
                    f"{sorted(maps)}.",
                    fix="leave layer_map unset (uniform mapping per stack)",
                )
            (stack, blocks), = student.items()
            layer_map = list(self.config.layer_map)
            if len(layer_map) != len(blocks) or not all(0 <= t < len(teacher[stack]) for t in layer_map):
                raise ConfigError(
                    f"techniques.distill.layer_map={layer_map} does not map the student's {len(blocks)} layers "
                    f"to teacher layers 0..{len(teacher[stack]) - 1}.",
                    expected=f"a list of {len(blocks)} teacher layer indices",
                    fix="give one teacher layer per student layer",
                )
            maps[stack] = layer_map
        return maps

    def _check_compatible(self, model: nn.Module, cfg: Any) -> None:
        problems = []
        if cfg.objective.name != self.teacher_cfg.objective.name:
            problems.append(f"objective {cfg.objective.name!r} vs the teacher's {self.teacher_cfg.objective.name!r}")
        if model.token_embedding.num_embeddings != self.teacher.token_embedding.num_embeddings:
            problems.append(
                f"vocabulary {model.token_embedding.num_embeddings} vs the teacher's {self.teacher.token_embedding.num_embeddings}"
            )
        if sorted(model.stacks) != sorted(self.teacher.stacks):
            problems.append(f"stacks {sorted(model.stacks)} vs the teacher's {sorted(self.teacher.stacks)}")
        if problems:
            raise ConfigError(
                f"The student cannot learn from teacher {self.config.teacher}: " + "; ".join(problems) + ".",
                expected="the teacher's objective and data (same vocabulary and architecture)",
                fix="train the student on the teacher's objective and data task",
            )

    def _check_attention_maps(self, model: nn.Module) -> None:
        if self.config.attention_weight <= 0:
            return
        from plugformer_plugins.attention.full import FullAttention

        for who, network in (("student", model), ("teacher", self.teacher)):
            for stack, blocks in stack_blocks(network).items():
                for index, block in enumerate(blocks):
                    if not isinstance(block.attention, FullAttention):
                        raise ConfigError(
                            f"techniques.distill.attention_weight needs attention maps, but the {who}'s "
                            f"{stack} layer {index} uses {type(block.attention).__name__}.",
                            expected="full attention in every layer of student and teacher",
                            fix="set techniques.distill.attention_weight=0, or use model/attention=full",
                        )


def teacher_targets(teacher: nn.Module, batch: dict[str, Tensor], facts: dict[str, Any]) -> dict[str, Tensor]:
    """The batch with the teacher's greedy output as its target: ``labels`` are the generated
    tokens up to and including the first end token (-100 after it), as long as the gold
    targets; the decoder's inputs are derived from them by the objective."""
    from plugformer.model.generation import DecodingConfig, generate

    labels = batch["labels"]
    with torch.no_grad():
        tokens = generate(
            teacher, batch["input_ids"], DecodingConfig(max_new_tokens=labels.shape[1]),
            attention_mask=batch.get("attention_mask"), start_id=facts.get("start_id"), eos_id=facts.get("eos_id"),
        )
    tokens = tokens[:, : labels.shape[1]]
    eos = facts.get("eos_id")
    if eos is not None:
        ended = (tokens == eos).long().cumsum(dim=1)
        after_end = (ended - (tokens == eos).long()) > 0  # strictly after the first end token
        tokens = tokens.masked_fill(after_end, -100)
    keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    return {**keep, "labels": tokens}


def initialise_from_teacher(student: nn.Module, teacher: nn.Module, stride: int | None) -> dict[str, list[int]]:
    """DistilBERT's initialisation: student block i of each stack ← teacher block i·k, and
    every tensor outside the blocks (embeddings, positions, final norms, head) whose name
    and shape match. Returns the teacher layers used per stack. Raises :class:`ConfigError`
    when a block's shapes differ (another width or other components)."""
    used: dict[str, list[int]] = {}
    student_stacks, teacher_stacks = stack_blocks(student), stack_blocks(teacher)
    with torch.no_grad():
        for stack, blocks in student_stacks.items():
            source = teacher_stacks[stack]
            k = stride or max(1, len(source) // len(blocks))
            layers = [i * k for i in range(len(blocks))]
            if layers[-1] >= len(source):
                raise ConfigError(
                    f"init_stride={k} takes teacher layer {layers[-1]}, but the teacher's {stack} has {len(source)} layers.",
                    fix="choose a smaller techniques.distill.init_stride",
                )
            for block, index in zip(blocks, layers):
                _copy_matching(block, source[index], strict=True, where=f"{stack} layer {index}")
            used[stack] = layers
        outside_student = {n: t for n, t in student.state_dict().items() if not _in_blocks(n)}
        teacher_state = teacher.state_dict()
        for name, tensor in outside_student.items():
            if name in teacher_state and teacher_state[name].shape == tensor.shape:
                tensor.copy_(teacher_state[name])
    return used


def _in_blocks(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "stacks" and parts[2] == "blocks"


#: Tensors other techniques add to a layer (pruning masks, fake-quantization observers): not weights.
_TECHNIQUE_STATE = ("_mask", "fake_quant", "activation_post_process")


def _plain_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A layer's weights by their plain names: a pruned ``weight_orig`` with its mask applied
    as ``weight``, and no tensors that other techniques added."""
    plain = {}
    for name, tensor in state.items():
        if any(marker in name for marker in _TECHNIQUE_STATE):
            continue
        if name.endswith("_orig"):
            mask = state.get(name.removesuffix("_orig") + "_mask")
            plain[name.removesuffix("_orig")] = tensor * mask if mask is not None else tensor
        else:
            plain[name] = tensor
    return plain


def _copy_matching(target: nn.Module, source: nn.Module, *, strict: bool, where: str) -> None:
    """Copy ``source``'s weights into ``target`` by plain name (either may carry pruning masks
    or fake-quantization observers of other techniques; a pruned target gets the weights in
    its ``weight_orig``)."""
    target_state = target.state_dict()
    source_plain = _plain_weights(source.state_dict())
    targets = {}
    for name, tensor in target_state.items():
        if any(marker in name for marker in _TECHNIQUE_STATE):
            continue
        targets[name.removesuffix("_orig") if name.endswith("_orig") else name] = tensor
    different = [n for n, t in targets.items() if n not in source_plain or source_plain[n].shape != t.shape]
    if different and strict:
        name = different[0]
        raise ConfigError(
            f"The student's layers cannot be initialised from the teacher's {where}: {name} is "
            f"{tuple(targets[name].shape)} in the student and "
            f"{tuple(source_plain[name].shape) if name in source_plain else 'absent'} in the teacher.",
            expected="student layers of the teacher's width and components (DistilBERT keeps them)",
            fix="set techniques.distill.init_from_teacher=false, or give the student the teacher's d_model and components",
        )
    for name, tensor in targets.items():
        if name not in different:
            tensor.copy_(source_plain[name])


COMPONENT = Component(
    kind="technique",
    name="distill",
    factory=Distill,
    config=DistillConfig,
    summary="Knowledge distillation from a finished run: logits with temperature, hidden states and attention maps.",
    reference="Hinton et al. 2015; Jiao et al. 2020 (TinyBERT); Sanh et al. 2019 (DistilBERT)",
)
