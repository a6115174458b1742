"""Causal language modelling: predict each token from the ones before it (a decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, Objective, ObjectiveOutput, bounds

IGNORE_INDEX = -100


@dataclass
class CausalLMConfig:
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))


class CausalLM(Objective):
    """Cross-entropy of ``labels`` (batch, length), aligned with the inputs (the data shifts),
    ignoring -100. Metrics: perplexity and accuracy over the scored tokens. The head is tied
    to the token embedding when the model ties embeddings."""

    main_metric = "accuracy"  # shown on the progress bar and in the closing block: next-token accuracy over the scored tokens

    def __init__(self, config: CausalLMConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.label_smoothing = config.label_smoothing
        self.head = nn.Linear(ctx.d_model, ctx.vocab_size, bias=False)
        if ctx.token_embedding is not None:
            self.head.weight = ctx.token_embedding.weight

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> ObjectiveOutput:
        logits = self.head(hidden)
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )
        metrics = {}
        if self.metrics_due:  # the argmax is skipped on training steps that log nothing
            scored = labels != IGNORE_INDEX
            correct = (logits.detach().argmax(-1) == labels) & scored
            metrics["accuracy"] = correct.sum() / scored.sum().clamp(min=1)
        metrics["perplexity"] = loss.detach().exp()
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=logits, hidden=hidden)


COMPONENT = Component(
    kind="objective",
    name="causal_lm",
    factory=CausalLM,
    config=CausalLMConfig,
    summary="Next-token cross-entropy with a decoder; perplexity and token accuracy.",
    reference="Radford et al. 2018, Improving Language Understanding by Generative Pre-Training",
    capabilities=Capabilities(provides={"causal_lm", "token_blocks", "decoder"}, requires={"attention": {"causal"}}),
)
