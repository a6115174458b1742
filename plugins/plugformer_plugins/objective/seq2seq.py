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
``generation_metric``, validation and test also log ``exact_match`` (and the same value under
its first name, ``generated_sequence_accuracy``): the share of examples that greedy decoding
(each attention's cache, stopping at the end token) gets exactly right, without teacher
forcing (equal to ``sequence_accuracy`` when decoding with the cache matches the full forward
pass; a gap reveals a cache bug). With ``bleu``, they log ``bleu``: corpus BLEU (sacrebleu,
13a tokenization, exp smoothing) of the greedy decodings against the targets over the whole
epoch, summed over DDP ranks. Task facts read: ``start_id`` (decoder inputs and generation)
and ``eos_id`` (generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, DataError, ModelInputs, Objective, ObjectiveOutput, bounds
from plugformer.model.generation import greedy

IGNORE_INDEX = -100


@dataclass
class Seq2SeqConfig:
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    # Greedy-decode validation and test batches and log <stage>/exact_match (also under its
    # first name, <stage>/generated_sequence_accuracy).
    generation_metric: bool = True
    # Greedy-decode validation and test batches and log <stage>/bleu: corpus BLEU over the epoch.
    bleu: bool = False


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

    main_metric = "sequence_accuracy"  # shown on the progress bar and in the closing block: examples whose whole target is right

    def __init__(self, config: Seq2SeqConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.label_smoothing = config.label_smoothing
        self.start_id = ctx.task.get("start_id")
        self.eos_id = ctx.task.get("eos_id")
        self.generation_metric = config.generation_metric
        self.bleu = config.bleu
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
        metrics = {}
        if self.metrics_due:  # the argmax is skipped on training steps that log nothing
            metrics["accuracy"], metrics["sequence_accuracy"] = target_accuracies(logits.detach(), labels)
        metrics["perplexity"] = loss.detach().exp()
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=logits, hidden=hidden)

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """Real source tokens plus scored target tokens."""
        mask = batch.get("attention_mask")
        source = mask.sum() if mask is not None else batch["input_ids"].numel()
        return source + (batch["labels"] != IGNORE_INDEX).sum()

    def examples_in(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


def exact_match(generated: Tensor, labels: Tensor) -> Tensor:
    """Share of examples whose ``generated`` (B, T) equals ``labels`` (B, T) at every scored
    position (labels -100 are not scored)."""
    return ((generated == labels) | (labels == IGNORE_INDEX)).all(dim=1).to(torch.float32).mean()


@torch.no_grad()
def generated_sequence_accuracy(model: Any, batch: dict[str, Tensor], start_id: int, eos_id: int | None) -> Tensor:
    """:func:`exact_match` of greedy decoding for a (prepared) seq2seq batch (decoding runs
    for the batch's target length; after the end token it repeats it)."""
    labels = batch["labels"]
    generated = greedy(
        model, batch["input_ids"], labels.shape[1], attention_mask=batch.get("attention_mask"), start_id=start_id, eos_id=eos_id
    )
    return exact_match(generated, labels)


# --- BLEU -------------------------------------------------------------------------------------

#: Length of :func:`bleu_statistics`: correct and total n-grams for n = 1..4, hypothesis and
#: reference lengths.
BLEU_STATISTICS = 10


def until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """``ids`` without -100 entries, up to (not including) the first ``eos_id``."""
    ids = [i for i in ids if i != IGNORE_INDEX]
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def ids_to_text(ids: list[int], tokenizer: Any = None) -> str:
    """A token sequence as text for BLEU: ``tokenizer.decode(ids)`` when a tokenizer is given,
    else the ids joined by spaces (each id one word)."""
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(str(i) for i in ids)


@lru_cache(maxsize=1)
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU()


def bleu_statistics(hypotheses: list[str], references: list[str]) -> Tensor:
    """BLEU's sufficient statistics (float64, :data:`BLEU_STATISTICS` long) of hypotheses
    against one reference each; statistics of parts of a corpus add up to the corpus's."""
    if not hypotheses:
        return torch.zeros(BLEU_STATISTICS, dtype=torch.float64)
    score = _bleu().corpus_score(hypotheses, [references])
    return torch.tensor([*score.counts, *score.totals, score.sys_len, score.ref_len], dtype=torch.float64)


def bleu_from_statistics(statistics: Tensor) -> float:
    """Corpus BLEU (0-100; sacrebleu's default exp smoothing) from summed :func:`bleu_statistics`."""
    from sacrebleu.metrics import BLEU

    values = [int(round(v)) for v in statistics.tolist()]
    return float(BLEU.compute_bleu(values[0:4], values[4:8], values[8], values[9], smooth_method="exp").score)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each, as the callback computes it."""
    return bleu_from_statistics(bleu_statistics(hypotheses, references))


def decoded_texts(generated: Tensor, labels: Tensor, eos_id: int | None, tokenizer: Any = None) -> tuple[list[str], list[str]]:
    """(hypotheses, references) as text: each greedy decoding and each target cut at the end
    token, through :func:`ids_to_text`."""
    hypotheses = [ids_to_text(until_eos(row, eos_id), tokenizer) for row in generated.tolist()]
    references = [ids_to_text(until_eos(row, eos_id), tokenizer) for row in labels.tolist()]
    return hypotheses, references


COMPONENT = Component(
    kind="objective",
    name="seq2seq",
    factory=Seq2Seq,
    config=Seq2SeqConfig,
    summary="Encoder–decoder sequence to sequence: teacher-forced cross-entropy, token and sequence accuracy.",
    reference="Vaswani et al. 2017, Attention Is All You Need; Sutskever et al. 2014, Sequence to Sequence Learning",
    capabilities=Capabilities(provides={"seq2seq", "encoder_decoder"}, requires={"attention": {"key_padding_mask"}}),
)
