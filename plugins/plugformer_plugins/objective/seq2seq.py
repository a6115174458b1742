"""Sequence to sequence with an encoder–decoder: teacher-forced cross-entropy of the target
given the source (Sutskever et al. 2014; the Transformer of Vaswani et al. 2017).

The batch (what a data task for this objective yields; ``B`` examples, source length ``S``,
target length ``T``):

- ``input_ids`` (B, S) long: the source, padded with the task's pad id;
- ``attention_mask`` (B, S) bool: True on real source tokens;
- ``labels`` (B, T) long: the target followed by its end token, -100 on padding;
- ``decoder_input_ids`` (B, T) long: the target shifted right behind the start token
  (``[start, y1, ..., yn]``), padded; optional, derived from ``labels`` and the task's
  ``start_id`` fact when absent;
- ``decoder_attention_mask`` (B, T) bool: True where ``labels`` is scored; optional, derived
  from ``labels`` when absent.

The encoder reads the source; the decoder reads ``decoder_input_ids`` and attends to the
encoder's output through its cross-attention. The loss is the mean cross-entropy over the
target tokens that are not -100. Metrics: ``accuracy`` (share of target tokens predicted
right) and ``sequence_accuracy`` (share of examples whose every target token is right, end
token included), both with teacher forcing; ``perplexity`` of the target tokens. With
``generation_metric``, validation and test also log ``generated_sequence_accuracy``: the
share of examples that greedy decoding (each attention's cache, stopping at the end token)
gets exactly right, without teacher forcing (equal to ``sequence_accuracy`` when decoding
with the cache matches the full forward pass; a gap reveals a cache bug). Task facts read:
``start_id`` (decoder inputs and generation) and ``eos_id`` (generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, DataError, ModelInputs, Objective, ObjectiveOutput, bounds
from plugformer.model.generation import greedy

IGNORE_INDEX = -100


@dataclass
class Seq2SeqConfig:
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    # Greedy-decode validation and test batches and log <stage>/generated_sequence_accuracy.
    generation_metric: bool = True


def shift_right(labels: Tensor, start_id: int, pad_id: int = 0) -> Tensor:
    """Decoder inputs for ``labels`` (B, T): ``[start, y1, ..., y(T-1)]``, and ``pad_id``
    wherever the label is -100 (padding)."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 0] = start_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(labels == IGNORE_INDEX, pad_id)


def target_accuracies(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(token accuracy over scored positions, share of examples with every scored position
    right) for logits (B, T, vocab) and labels (B, T) with -100 where not scored. An example
    with no scored position counts as right."""
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & scored
    tokens = correct.sum() / scored.sum().clamp(min=1)
    sequences = (correct | ~scored).all(dim=1).to(torch.float32).mean()
    return tokens, sequences


class Seq2Seq(Objective):
    """Teacher-forced cross-entropy of the target, a token head on the decoder's hidden
    states (tied to the token embedding when the model ties embeddings), token and
    sequence accuracy. See the module docstring for the batch format."""

    def __init__(self, config: Seq2SeqConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.label_smoothing = config.label_smoothing
        self.start_id = ctx.task.get("start_id")
        self.eos_id = ctx.task.get("eos_id")
        self.generation_metric = config.generation_metric
        self.pad_id = int(ctx.task.get("pad_id", 0))
        self.head = nn.Linear(ctx.d_model, ctx.vocab_size, bias=False)
        if ctx.token_embedding is not None:
            self.head.weight = ctx.token_embedding.weight

    def model_inputs(self, batch: dict[str, Tensor]) -> ModelInputs:
        decoder_input_ids = batch.get("decoder_input_ids")
        if decoder_input_ids is None:
            if self.start_id is None:
                raise DataError(
                    "The seq2seq batch has no decoder_input_ids, and the data task names no start token to derive them.",
                    expected="decoder_input_ids in each batch, or a data task whose facts include start_id",
                    fix="use a seq2seq data task (data=algorithmic or data=pairs), or add decoder_input_ids to the batches",
                )
            decoder_input_ids = shift_right(batch["labels"], int(self.start_id), self.pad_id)
        decoder_mask = batch.get("decoder_attention_mask")
        if decoder_mask is None:
            decoder_mask = batch["labels"] != IGNORE_INDEX
        return ModelInputs(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
        )

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
        accuracy, sequence_accuracy = target_accuracies(logits.detach(), labels)
        metrics = {"accuracy": accuracy, "sequence_accuracy": sequence_accuracy, "perplexity": loss.detach().exp()}
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=logits, hidden=hidden)

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        """Real source tokens plus scored target tokens."""
        mask = batch.get("attention_mask")
        source = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return source + int((batch["labels"] != IGNORE_INDEX).sum())

    def examples_in(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


@torch.no_grad()
def generated_sequence_accuracy(model: Any, batch: dict[str, Tensor], start_id: int, eos_id: int | None) -> Tensor:
    """Share of examples whose greedy decoding equals ``labels`` at every scored position
    (decoding runs for the batch's target length; after the end token it repeats it)."""
    labels = batch["labels"]
    generated = greedy(
        model, batch["input_ids"], labels.shape[1], attention_mask=batch.get("attention_mask"), start_id=start_id, eos_id=eos_id
    )
    return ((generated == labels) | (labels == IGNORE_INDEX)).all(dim=1).to(torch.float32).mean()


class GenerationMetric(pl.Callback):
    """Logs ``<stage>/generated_sequence_accuracy`` on validation and test batches of a
    model whose objective is :class:`Seq2Seq` with ``generation_metric`` on."""

    def _log(self, module: pl.LightningModule, batch: dict[str, Tensor], stage: str) -> None:
        model = getattr(module, "model", None)
        objective = getattr(model, "objective", None)
        if not isinstance(objective, Seq2Seq) or not objective.generation_metric or objective.start_id is None:
            return
        value = generated_sequence_accuracy(model, batch, int(objective.start_id), objective.eos_id)
        module.log(
            f"{stage}/generated_sequence_accuracy", value, on_step=False, on_epoch=True, sync_dist=True,
            batch_size=objective.examples_in(batch),
        )

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log(pl_module, batch, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log(pl_module, batch, "test")


COMPONENT = Component(
    kind="objective",
    name="seq2seq",
    factory=Seq2Seq,
    config=Seq2SeqConfig,
    summary="Encoder–decoder sequence to sequence: teacher-forced cross-entropy, token and sequence accuracy.",
    reference="Vaswani et al. 2017, Attention Is All You Need; Sutskever et al. 2014, Sequence to Sequence Learning",
    capabilities=Capabilities(provides={"seq2seq", "encoder_decoder"}, requires={"attention": {"key_padding_mask"}}),
)
