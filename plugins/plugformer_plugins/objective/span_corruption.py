"""Span corruption with an encoder–decoder: T5's pre-training objective (Raffel et al. 2020,
Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer).

The batch the data task yields (``token_blocks``): ``input_ids`` (B, T) long, optionally
``attention_mask`` (B, T) bool, True on real tokens, which come first in each row (right
padding); any ``labels`` it carries (the text task's next-token labels) are ignored.
:meth:`SpanCorruption.prepare_batch` corrupts every row afresh, as T5's
``random_spans_noise_mask`` does, for a row of ``L`` real tokens:

- noise tokens ``n = round(L · noise_density)``, kept within 1..L−1; noise spans
  ``k = max(1, round(n / mean_span_length))`` (at most the number of non-noise tokens);
- the ``n`` noise tokens and the ``L − n`` others are each cut into ``k`` non-empty spans at
  uniformly random places, and the spans alternate, a non-noise one first (so a noise
  one last);
- source: the row with noise span ``j`` replaced by the sentinel ``sentinel_ids[j]``, then
  ``eos_id``; target: for each noise span its sentinel then its tokens, then ``eos_id``.

So the source, with each sentinel replaced by the target's tokens behind the same sentinel,
is the original row (plus the end token). The prepared batch is in :mod:`seq2seq`'s format,
padded across the batch: ``input_ids`` and ``attention_mask`` (the source), ``labels`` (the
target, -100 on padding), ``decoder_input_ids`` (``labels`` shifted right behind
``start_id``) and ``decoder_attention_mask``. Randomness comes from
:meth:`plugformer.Objective.batch_generator`: fresh spans for every training batch, the same
spans for a validation batch at every validation.

Loss, metrics, head and model inputs are :class:`~plugformer_plugins.objective.seq2seq.Seq2Seq`'s
(the metrics are over the target: sentinels, span tokens and the end token). Task facts read
(``ctx.task``): ``sentinel_ids`` (a list, in order), ``eos_id``, ``start_id`` and ``pad_id``.
The factory refuses a data task with fewer sentinels than a block of ``ctx.max_length``
tokens has spans, and settings whose source or target would be longer than that block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, ConfigError, DataError, bounds
from plugformer_plugins.objective.seq2seq import IGNORE_INDEX, Seq2Seq, Seq2SeqConfig, shift_right


@dataclass
class SpanCorruptionConfig(Seq2SeqConfig):
    # Share of each block's tokens that are masked out (predicted by the decoder).
    noise_density: float = field(default=0.15, metadata=bounds(gt=0.0, lt=1.0))
    # Mean length of a masked span, in tokens.
    mean_span_length: float = field(default=3.0, metadata=bounds(ge=1.0))
    # Greedy decoding of whole span targets is rarely exactly right; off unless asked for.
    generation_metric: bool = False


def span_counts(lengths: Tensor, noise_density: float, mean_span_length: float) -> tuple[Tensor, Tensor]:
    """(noise tokens, noise spans) for rows of ``lengths`` real tokens (long tensors of the
    same shape), rounded as T5 does (half to even). Rows shorter than 2 get no noise."""
    lengths = lengths.long()
    noise = torch.round(lengths.double() * noise_density).long()
    noise = torch.minimum(noise.clamp(min=1), lengths - 1).clamp(min=0)
    spans = torch.round(noise.double() / mean_span_length).long().clamp(min=1)
    spans = torch.minimum(spans, torch.minimum(noise, lengths - noise))
    return noise, spans


def random_segmentation(items: Tensor, segments: Tensor, width: int, generator: torch.Generator | None) -> Tensor:
    """Segment lengths (B, width): row b cuts ``items[b]`` items into ``segments[b]``
    non-empty segments, the cuts chosen uniformly among the ``items[b] − 1`` gaps (T5's
    ``_random_segmentation``); columns past ``segments[b]`` are 0. ``width`` must be at
    least the largest count of segments and of items."""
    batch, device = items.shape[0], items.device
    gaps = torch.arange(1, width, device=device)
    scores = torch.rand(batch, width - 1, device=device, generator=generator)
    scores = scores.masked_fill(gaps[None, :] >= items[:, None], 2.0)  # non-gaps rank last
    rank = scores.argsort(dim=1).argsort(dim=1)
    cut = rank < (segments[:, None] - 1)
    segment = F.pad(cut.long(), (1, 0)).cumsum(dim=1)  # (B, width): segment of each item
    real = torch.arange(width, device=device)[None, :] < items[:, None]
    lengths = torch.zeros(batch, width, dtype=torch.long, device=device)
    return lengths.scatter_add_(1, segment.masked_fill(~real, 0), real.long())


def noise_mask(lengths: Tensor, width: int, noise_density: float, mean_span_length: float, generator: torch.Generator | None) -> Tensor:
    """(B, width) bool, True on the noise tokens of rows of ``lengths`` real tokens (T5's
    ``random_spans_noise_mask``: non-noise and noise spans alternate, non-noise first)."""
    noise, spans = span_counts(lengths, noise_density, mean_span_length)
    noise_lengths = random_segmentation(noise, spans, width, generator)
    other_lengths = random_segmentation(lengths - noise, spans, width, generator)
    interleaved = torch.stack([other_lengths, noise_lengths], dim=2).flatten(1)  # (B, 2·width)
    starts = interleaved.cumsum(dim=1)[:, :-1].clamp(max=width)
    indicator = torch.zeros(lengths.shape[0], width + 1, dtype=torch.long, device=lengths.device)
    indicator.scatter_add_(1, starts, torch.ones_like(starts))
    odd = indicator[:, :width].cumsum(dim=1) % 2 == 1
    real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return odd & real & (spans > 0)[:, None]


def corrupt(
    ids: Tensor, real: Tensor, noise: Tensor, sentinel_ids: Tensor, *, eos_id: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(source (B, S) padded with ``pad_id``, its mask (B, S) bool, target (B, U) padded with
    -100) from ``ids`` (B, T), its real-token mask and its noise mask (both (B, T) bool): each
    noise span becomes its sentinel in the source, and its sentinel followed by its tokens in
    the target; both end with ``eos_id``. ``sentinel_ids`` (long) must hold a sentinel for
    every span."""
    batch, device = ids.shape[0], ids.device
    rows = torch.arange(batch, device=device)
    first = noise & ~F.pad(noise[:, :-1], (1, 0), value=False)  # the first token of each span
    span = first.long().cumsum(dim=1)  # spans started so far, this one included
    sentinels = sentinel_ids[(span - 1).clamp(min=0, max=len(sentinel_ids) - 1)]

    keep = real & (~noise | first)
    source_lengths = keep.sum(dim=1) + 1
    width = int(source_lengths.max())
    source = torch.full((batch, width + 1), pad_id, dtype=ids.dtype, device=device)  # last column: discarded writes
    source.scatter_(1, torch.where(keep, keep.long().cumsum(dim=1) - 1, width), torch.where(first, sentinels, ids))
    source = source[:, :width]
    source[rows, source_lengths - 1] = eos_id
    source_mask = torch.arange(width, device=device)[None, :] < source_lengths[:, None]

    position = noise.long().cumsum(dim=1) - 1 + span  # of each noise token in the target
    target_lengths = noise.sum(dim=1) + first.sum(dim=1) + 1
    width = int(target_lengths.max())
    target = torch.full((batch, width + 1), IGNORE_INDEX, dtype=ids.dtype, device=device)
    target.scatter_(1, torch.where(noise, position, width), ids)
    target.scatter_(1, torch.where(first, position - 1, width), sentinels)
    target = target[:, :width]
    target[rows, target_lengths - 1] = eos_id
    return source, source_mask, target


class SpanCorruption(Seq2Seq):
    """T5's span corruption on text blocks, trained as :class:`Seq2Seq`; see the module
    docstring for the batch it makes and the facts it reads."""

    def __init__(self, config: SpanCorruptionConfig, ctx: BuildContext) -> None:
        super().__init__(config, ctx)
        self.noise_density = config.noise_density
        self.mean_span_length = config.mean_span_length
        sentinel_ids = list(ctx.task.get("sentinel_ids") or ())
        missing = [name for name, value in (("sentinel_ids", sentinel_ids), ("eos_id", self.eos_id), ("start_id", self.start_id)) if value in (None, [])]
        if missing:
            raise ConfigError(
                f"The span_corruption objective needs sentinel, end and start tokens, but the data task declares no {', '.join(missing)}.",
                expected="a data task whose facts include sentinel_ids, eos_id and start_id, such as data=text with data.sentinel_tokens > 0",
                fix="choose data=text and set data.sentinel_tokens (e.g. 100), or another objective (objective=causal_lm)",
            )
        bad = [i for i in sentinel_ids if not 0 <= int(i) < ctx.vocab_size]
        if bad:
            raise ConfigError(
                f"The data task's sentinel ids {bad[:5]} lie outside its vocabulary of {ctx.vocab_size} ids.",
                expected="sentinel ids below the vocabulary size",
                fix="report this to the authors of the data task",
            )
        self.check_fits(ctx.max_length, len(sentinel_ids))
        self.register_buffer("sentinel_ids", torch.tensor(sentinel_ids, dtype=torch.long), persistent=False)

    def check_fits(self, length: int, sentinels: int) -> None:
        """Raise :class:`ConfigError` when a block of ``length`` tokens has more spans than
        there are sentinels, or a source or target longer than the block."""
        noise, spans = (int(v) for v in span_counts(torch.tensor(length), self.noise_density, self.mean_span_length))
        settings = f"objective.noise_density={self.noise_density}, objective.mean_span_length={self.mean_span_length}"
        if spans > sentinels:
            raise ConfigError(
                f"span_corruption masks {spans} spans ({noise} noise tokens) in a block of {length} tokens "
                f"({settings}), but the data task has only {sentinels} sentinel tokens.",
                expected=f"at least {spans} sentinel tokens, one for each span of a block",
                fix=f"raise data.sentinel_tokens to {spans} or more, or mask fewer spans (lower objective.noise_density, "
                "raise objective.mean_span_length, or lower data.block_size)",
            )
        source, target = length - noise + spans + 1, noise + spans + 1
        if max(source, target) > length:
            raise ConfigError(
                f"span_corruption would make {'sources' if source > length else 'targets'} of {max(source, target)} "
                f"tokens from blocks of {length} ({noise} noise tokens in {spans} spans, {settings}); the model "
                f"handles sequences of at most {length}.",
                expected="a source (kept tokens, one sentinel per span, end token) and a target (sentinels, noise "
                "tokens, end token) no longer than a block",
                fix="raise data.block_size, raise objective.mean_span_length (spans of one token lengthen the source), "
                "or lower objective.noise_density",
            )

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The seq2seq batch of the corrupted blocks (module docstring); the data task's
        ``labels`` are dropped."""
        ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        lengths = real.sum(dim=1)
        noise = noise_mask(lengths, ids.shape[1], self.noise_density, self.mean_span_length, self.batch_generator(batch))
        spans = int(span_counts(lengths, self.noise_density, self.mean_span_length)[1].max()) if ids.numel() else 0
        if spans > len(self.sentinel_ids):
            raise DataError(
                f"A batch of blocks of {ids.shape[1]} tokens needs {spans} sentinels; the data task has {len(self.sentinel_ids)}.",
                expected="blocks no longer than the data task's max_length, which the objective was built for",
                fix="raise data.sentinel_tokens",
            )
        source, source_mask, labels = corrupt(ids, real, noise, self.sentinel_ids, eos_id=int(self.eos_id), pad_id=self.pad_id)
        return {
            "input_ids": source,
            "attention_mask": source_mask,
            "labels": labels,
            "decoder_input_ids": shift_right(labels, int(self.start_id), self.pad_id),
            "decoder_attention_mask": labels != IGNORE_INDEX,
        }

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor | int:
        """Tokens of text read: the real tokens of the data task's blocks (the throughput
        callback sees the batch before :meth:`prepare_batch`); of a prepared batch, its real
        source and target tokens."""
        if "decoder_input_ids" in batch:
            return super().count_tokens(batch)
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else batch["input_ids"].numel()


COMPONENT = Component(
    kind="objective",
    name="span_corruption",
    factory=SpanCorruption,
    config=SpanCorruptionConfig,
    summary="T5 span corruption: masked spans of text become sentinels, an encoder–decoder predicts them.",
    reference="Raffel et al. 2020, Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer (T5)",
    capabilities=Capabilities(
        provides={"span_corruption", "token_blocks", "encoder_decoder"},
        requires={"attention": {"key_padding_mask"}, "data": {"sentinel_tokens", "eos_token"}},
    ),
)
