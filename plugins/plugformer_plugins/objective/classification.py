"""Sequence classification with an encoder: pool the hidden states, then a linear head."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, ConfigError, ModelInputs, Objective, ObjectiveOutput, bounds

#: The extras key of the per-token global-attention mask (docs/plugins.md, "The objective owns the batch").
GLOBAL_MASK = "global_mask"


class Pooling(str, Enum):
    """``cls``: the hidden state at position 0, where the data task puts a CLS token.
    ``mean``: the mean over the positions that ``attention_mask`` marks as real."""

    cls = "cls"
    mean = "mean"


@dataclass
class ClassificationConfig:
    pooling: Pooling = Pooling.cls
    # Dropout on the pooled vector, before the head.
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: Pooling) -> Tensor:
    """(batch, length, d_model) → (batch, d_model). Without a mask every position is real."""
    if Pooling(pooling) is Pooling.cls:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Classification(Objective):
    """Cross-entropy of ``labels`` (batch,) against a linear head on the pooled hidden
    states. Metric: accuracy. The encoder (bidirectional attention) follows from the
    capabilities; ``num_classes`` comes from the data task's facts (``ctx.task``). With CLS
    pooling it marks the CLS token in ``extras["global_mask"]``, so an attention with global
    tokens (``longformer``) lets it see the whole sequence, as Longformer does for
    classification; a ``global_mask`` in the batch is passed on there too."""

    main_metric = "accuracy"  # shown on the progress bar and in the closing block

    def __init__(self, config: ClassificationConfig, ctx: BuildContext) -> None:
        super().__init__()
        num_classes = ctx.task.get("num_classes")
        if num_classes is None:
            raise ConfigError(
                "The classification objective needs the number of classes, but the data task did not set it.",
                expected="a classification data task (one that sets num_classes), such as data=listops",
                fix="choose a classification data task, or another objective for this data",
            )
        self.pooling = Pooling(config.pooling)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(ctx.d_model, num_classes)

    def model_inputs(self, batch: dict[str, Tensor]) -> ModelInputs:
        """The default inputs, with ``extras["global_mask"]``: the batch's own ``global_mask``
        (from a data task that marks tokens) and, with CLS pooling, the CLS token."""
        inputs = super().model_inputs(batch)
        marked = batch.get(GLOBAL_MASK)
        if self.pooling is Pooling.cls:
            cls = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            cls[:, 0] = True
            marked = cls if marked is None else marked.bool() | cls
        if marked is not None:
            inputs.extras[GLOBAL_MASK] = marked
        return inputs

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> ObjectiveOutput:
        pooled = pool(hidden, batch.get("attention_mask"), self.pooling)
        logits = self.head(self.drop(pooled))
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        metrics = {}
        if self.metrics_due:  # the argmax is skipped on training steps that log nothing
            metrics["accuracy"] = (logits.detach().argmax(-1) == labels).to(torch.float32).mean()
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=logits, hidden=hidden)


COMPONENT = Component(
    kind="objective",
    name="classification",
    factory=Classification,
    config=ClassificationConfig,
    summary="Sequence classification with an encoder: CLS or mean pooling, linear head, accuracy.",
    reference="Devlin et al. 2019, BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
    capabilities=Capabilities(
        provides={"classification", "encoder"}, requires={"attention": {"bidirectional", "key_padding_mask"}}
    ),
)
