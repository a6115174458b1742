"""Masked language modelling with an encoder (BERT: Devlin et al. 2019), masks drawn afresh
for every batch (RoBERTa's dynamic masking: Liu et al. 2019).

The batch the data task yields (``token_blocks``): ``input_ids`` (B, T) long, optionally
``attention_mask`` (B, T) bool (True on real tokens); any ``labels`` it carries (the text
task's next-token labels) are ignored and replaced. :meth:`MaskedLM.prepare_batch` turns it
into the batch the model and the loss see:

- every real (``attention_mask``), non-special token is *selected* with probability
  ``mask_probability``; an example with at least one candidate gets at least one selected;
- ``labels`` (B, T): the original id at selected positions, -100 elsewhere;
- ``input_ids``: of the selected positions, a share ``replace_mask`` becomes the mask id, a
  share ``replace_random`` a random non-special token id, the rest stay unchanged.

Randomness comes from :meth:`plugformer.Objective.batch_generator`: fresh masks for every
training batch, the same masks for a validation batch at every validation.

Task facts read (``ctx.task``): ``mask_id`` (required), ``special_ids`` (never selected and
never drawn as random replacements) and ``pad_id``. The loss is the cross-entropy over the
selected positions only; metrics ``accuracy`` (over them) and ``perplexity`` (exp of the loss).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, ConfigError, Objective, ObjectiveOutput, bounds

IGNORE_INDEX = -100


@dataclass
class MaskedLMConfig:
    # Share of the real, non-special tokens selected for prediction.
    mask_probability: float = field(default=0.15, metadata=bounds(gt=0.0, le=1.0))
    # Of the selected tokens: share replaced by the mask token, share replaced by a random
    # token; the rest (1 - both) are kept unchanged.
    replace_mask: float = field(default=0.8, metadata=bounds(ge=0.0, le=1.0))
    replace_random: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))
    # BERT's head: dense + GELU + LayerNorm before the (tied) vocabulary projection.
    head_transform: bool = True
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))


def _special_ids(ctx: BuildContext, mask_id: int) -> list[int]:
    """The ids never selected nor drawn: ``special_ids``, the pad id and the mask id."""
    special = ctx.task.get("special_ids") or ()
    ids = {int(i) for i in (special if isinstance(special, Iterable) else (special,))}
    ids.add(mask_id)
    if ctx.task.get("pad_id") is not None:
        ids.add(int(ctx.task["pad_id"]))
    return sorted(i for i in ids if 0 <= i < ctx.vocab_size)


class MaskedLM(Objective):
    """BERT's masked-token cross-entropy on an encoder; see the module docstring for the
    batch it makes and the facts it reads. The vocabulary projection is tied to the token
    embedding when the model ties embeddings, with its own bias."""

    main_metric = "accuracy"  # shown on the progress bar and in the closing block: accuracy over the masked tokens

    def __init__(self, config: MaskedLMConfig, ctx: BuildContext) -> None:
        super().__init__()
        mask_id = ctx.task.get("mask_id")
        if mask_id is None:
            raise ConfigError(
                "The masked_lm objective needs a mask token, but the data task declares none (no mask_id fact).",
                expected="a data task whose facts include mask_id and special_ids, such as data=text",
                fix="choose a data task with a mask token (data=text), or another objective (objective=causal_lm)",
            )
        if config.replace_mask + config.replace_random > 1.0:
            raise ConfigError(
                f"objective.replace_mask={config.replace_mask} and objective.replace_random={config.replace_random} "
                "add up to more than 1.",
                expected="replace_mask + replace_random <= 1 (the rest of the selected tokens are kept)",
                fix="lower objective.replace_mask or objective.replace_random (BERT: 0.8 and 0.1)",
            )
        self.mask_probability = config.mask_probability
        self.replace_mask = config.replace_mask
        self.replace_random = config.replace_random
        self.label_smoothing = config.label_smoothing
        self.mask_id = int(mask_id)
        self.pad_id = int(ctx.task.get("pad_id", 0))
        special = _special_ids(ctx, self.mask_id)
        allowed = sorted(set(range(ctx.vocab_size)) - set(special))
        if not allowed:
            raise ConfigError(
                f"Every one of the {ctx.vocab_size} token ids is special; masked LM has nothing to predict.",
                expected="a vocabulary with ordinary tokens besides special_ids",
                fix="check the data task's special_ids and vocab_size",
            )
        # Buffers follow the model to its device; not saved (they come from the task).
        self.register_buffer("special", torch.tensor(special, dtype=torch.long), persistent=False)
        self.register_buffer("replacements", torch.tensor(allowed, dtype=torch.long), persistent=False)
        self.transform = (
            nn.Sequential(nn.Linear(ctx.d_model, ctx.d_model), nn.GELU(), nn.LayerNorm(ctx.d_model))
            if config.head_transform
            else nn.Identity()
        )
        self.head = nn.Linear(ctx.d_model, ctx.vocab_size, bias=True)
        if ctx.token_embedding is not None:
            self.head.weight = ctx.token_embedding.weight

    # The batch ---------------------------------------------------------------------------
    def candidates(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T) bool: real tokens that are not special, the only ones ever selected."""
        ids = batch["input_ids"]
        real = torch.isin(ids, self.special.to(ids.device), invert=True)
        mask = batch.get("attention_mask")
        return real if mask is None else real & mask.bool()

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The masked batch (a new dict; the input is not modified): ``input_ids`` corrupted
        and ``labels`` set as the module docstring says."""
        ids = batch["input_ids"]
        generator = self.batch_generator(batch)
        candidates = self.candidates(batch)
        draw = torch.rand(ids.shape, generator=generator, device=ids.device)
        selected = (draw < self.mask_probability) & candidates
        # At least one per example that has a candidate: its candidate with the lowest draw.
        lowest = draw.masked_fill(~candidates, 2.0).argmin(dim=1, keepdim=True)
        forced = torch.zeros_like(selected).scatter_(1, lowest, True) & candidates
        selected |= forced & ~selected.any(dim=1, keepdim=True)

        choice = torch.rand(ids.shape, generator=generator, device=ids.device)
        to_mask = selected & (choice < self.replace_mask)
        to_random = selected & (choice >= self.replace_mask) & (choice < self.replace_mask + self.replace_random)
        index = torch.randint(len(self.replacements), ids.shape, generator=generator, device=ids.device)
        random_ids = self.replacements.to(ids.device)[index].to(ids.dtype)

        masked = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        masked = torch.where(to_random, random_ids, masked)
        labels = torch.where(selected, ids.long(), torch.full_like(ids, IGNORE_INDEX, dtype=torch.long))
        return {**batch, "input_ids": masked, "labels": labels}

    # The head and the loss ---------------------------------------------------------------
    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.transform(hidden))

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> ObjectiveOutput:
        logits = self.logits(hidden)
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        count = scored.sum().clamp(min=1)
        total = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        loss = total / count  # 0, not NaN, for a batch with nothing selected
        metrics = {}
        if self.metrics_due:  # the argmax is skipped on training steps that log nothing
            correct = (logits.detach().argmax(-1) == labels) & scored
            metrics["accuracy"] = correct.sum() / count
        metrics["perplexity"] = loss.detach().exp()
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=logits, hidden=hidden)

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """Real tokens: those ``attention_mask`` marks, else those that are not padding."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else (batch["input_ids"] != self.pad_id).sum()


COMPONENT = Component(
    kind="objective",
    name="masked_lm",
    factory=MaskedLM,
    config=MaskedLMConfig,
    summary="Masked language modelling with an encoder (BERT 80/10/10, dynamic masking); masked-token accuracy.",
    reference=(
        "Devlin et al. 2019, BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding; "
        "Liu et al. 2019, RoBERTa: A Robustly Optimized BERT Pretraining Approach (dynamic masking)"
    ),
    capabilities=Capabilities(
        provides={"masked_lm", "token_blocks", "encoder"},
        requires={"attention": {"bidirectional"}, "data": {"mask_token"}},
    ),
)
