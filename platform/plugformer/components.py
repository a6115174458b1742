"""Contracts of the component kinds: build contexts, positions, feed-forward layers,
objectives and data tasks. Attention lives in :mod:`plugformer.attention`, blocks in
:mod:`plugformer.blocks`.

Shapes: ``x`` is (batch, length, d_model); inside attention, q/k/v are
(batch, heads, length, head_dim); ``mask`` is a key padding mask (batch, length), True for
real tokens; ``positions`` is a LongTensor (batch or 1, length) of absolute token positions
(a leading 1 when every example has the same positions, which keeps biases small).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

ARCHITECTURES = ("decoder", "encoder", "encoder_decoder")


@dataclass(frozen=True)
class BuildContext:
    """What a model component's factory may read: the model's sizes and its neighbours.

    ``causal``: the attention built with this context masks future keys (decoder
    self-attention). ``cross``: it is a cross-attention (queries from ``x``, keys and values
    from ``context=``). ``stack`` is "encoder" or "decoder"; ``n_layers`` the number of
    layers of this stack and ``encoder_layers``/``decoder_layers`` those of the whole model
    (0 for a missing stack; DeepNorm's gains depend on them). ``position`` is the stack's
    position component as seen by this layer (:meth:`PositionEncoding.for_layer`);
    ``token_embedding`` is the input embedding (objectives tie their head to it);
    ``task`` holds the data task's facts (``num_classes``, ...), which the core passes on
    without reading them. ``head_size`` is ``model.head_dim`` (None: d_model / n_heads); read
    :attr:`head_dim`, which resolves it.
    """

    d_model: int
    n_heads: int
    n_layers: int
    dropout: float
    causal: bool
    max_length: int
    vocab_size: int
    n_kv_heads: int | None = None
    head_size: int | None = None
    layer_index: int = 0
    cross: bool = False
    stack: str = "decoder"
    encoder_layers: int = 0
    decoder_layers: int = 0
    task: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    position: PositionEncoding | None = field(default=None, compare=False)
    token_embedding: nn.Embedding | None = field(default=None, compare=False)

    @property
    def head_dim(self) -> int:
        """Dimensions per head: ``model.head_dim`` when set (then n_heads·head_dim may differ
        from d_model, as in some Llama-family models), else d_model / n_heads."""
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or one per query head (multi-head attention)."""
        return self.n_kv_heads or self.n_heads


@dataclass(frozen=True)
class DataContext:
    """What a data task's factory may read: where to cache, the run's seed, and the run's
    directory (None outside a run). A task that fits something to its training data (a
    tokenizer) saves it in ``run_dir`` and, when it is already there (a resumed run, or
    ``plugformer eval``/``generate`` on other data), uses that copy, so a run always reads
    its data exactly as it was trained."""

    cache_dir: Path
    seed: int = 0
    run_dir: Path | None = None


def mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    """Mark the last projection of a residual branch, initialized smaller with depth (GPT-2)."""
    linear.scale_init_by_depth = True  # type: ignore[attr-defined]
    return linear


class PositionEncoding(nn.Module):
    """A position component contributes any of these; the defaults contribute nothing.

    - :meth:`embed`: embeddings added to the token embeddings at the input;
    - :meth:`transform_qk`: a transform of queries and keys inside attention (rotary);
    - :meth:`score_bias`: an additive bias on attention scores that depends on positions
      only (ALiBi, T5 buckets);
    - :meth:`relative_scores` and :meth:`relative_values`: content-dependent relative terms
      (Shaw: q·a^K on the scores, Σ α·a^V on the output).

    Position tensors may carry extra dimensions between the batch and the length (a
    blockwise attention passes (batch, blocks, block) tensors); every method must work for
    any such shapes. A position that owns parameters per layer returns a per-layer view from
    :meth:`for_layer`.
    """

    def embed(self, positions: Tensor) -> Tensor | None:
        """(batch or 1, length, d_model) added to the input embeddings, or None."""
        return None

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Transformed (q, k), both (batch, heads, length, head_dim), for positions
        (batch or 1, length)."""
        return q, k

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Bias (batch or 1, heads, ..., Lq, Lk) for position tensors (batch or 1, ..., Lq) and
        (batch or 1, ..., Lk), or None. Added to the scaled scores before the softmax."""
        return None

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """A content-dependent score term (batch, heads, ..., Lq, Lk) for queries ``q``
        (batch, heads, ..., Lq, head_dim), or None. Added to the scaled scores."""
        return None

    def relative_values(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """A term (batch, heads, ..., Lq, head_dim) added to the attention output, from the
        attention weights (batch, heads, ..., Lq, Lk), or None."""
        return None

    def for_layer(self, index: int) -> PositionEncoding:
        """The position as seen by layer ``index`` of its stack: itself, unless it owns
        per-layer parameters (then a submodule of itself, so parameters are registered once)."""
        return self


class FeedForward(nn.Module):
    """A position-wise sublayer (batch, length, d_model) → same shape.

    :meth:`aux_losses` reports auxiliary losses of the last forward pass (MoE balance, z-loss),
    already weighted; the training loop adds them to the optimized loss.
    """

    def aux_losses(self) -> dict[str, Tensor]:
        return {}


@dataclass
class ObjectiveOutput:
    """The result of an objective on one batch: the loss, metrics (scalars) and the logits."""

    loss: Tensor
    metrics: dict[str, Tensor]
    logits: Tensor | None = None
    hidden: Tensor | None = None


@dataclass
class ModelInputs:
    """What the model receives from a batch; the objective decides (:meth:`Objective.model_inputs`).

    ``input_ids``/``attention_mask``/``positions`` feed the only stack, or the encoder of an
    encoder–decoder, whose decoder gets the ``decoder_*`` ones. ``extras`` are further
    inputs by name, handed to every block and attention as ``extras=``: per-token tensors
    (batch, length) such as global-token masks, or per-chunk ones (batch, chunks, ...) such
    as RETRO's retrieved neighbours; a layer ignores the keys it does not know. ``reset``
    (batch,) bool marks rows whose carried state starts afresh (a new document in a stream).
    """

    input_ids: Tensor
    attention_mask: Tensor | None = None
    positions: Tensor | None = None
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None
    decoder_positions: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    reset: Tensor | None = None


class Objective(nn.Module):
    """Owns the head, the batch format and the loss.

    Its capabilities name the architecture it needs: it provides one of "decoder",
    "encoder", "encoder_decoder" (a v1 objective that provides none is a decoder when it
    requires "causal" attention, an encoder otherwise). ``forward(hidden, batch)`` returns
    an :class:`ObjectiveOutput` for the last stack's hidden states; :meth:`model_inputs`
    says what the model receives; :meth:`tokens_in` and :meth:`examples_in` count a batch.
    The core reads nothing else from a batch.

    ``metrics_due`` is False while the training loop runs a step whose metrics no logger
    reads (most training steps: they are logged every ``trainer.log_every_n_steps``):
    ``forward`` may then leave out metrics that cost a pass over the logits (an argmax for
    accuracy); the loss is always needed. It is True everywhere else.
    """

    metrics_due: bool = True

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

    def prepare_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch the model and :meth:`forward` see, made from the data task's batch on its
        device: masking (BERT), span corruption (T5) and the like happen here, so each epoch
        sees fresh noise (dynamic masking). The training loop and ``plugformer eval`` call it
        once per batch; ``model(batch)`` does not. Randomness comes from
        :meth:`batch_generator`. By default the batch is returned unchanged."""
        return batch

    def batch_generator(self, batch: dict[str, Tensor]) -> torch.Generator | None:
        """The random generator :meth:`prepare_batch` draws from: None (torch's global
        generator, seeded by the run) while training; in eval mode a generator seeded from the
        batch's tokens, so validation noise is the same at every validation and comparable
        across runs."""
        if self.training:
            return None
        ids = batch["input_ids"]
        seed = int((ids.long().flatten()[:4096] * torch.arange(1, min(ids.numel(), 4096) + 1, device=ids.device)).sum())
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(seed % (2**63))
        return generator

    def model_inputs(self, batch: dict[str, Tensor]) -> ModelInputs:
        """The model's inputs from a batch; by default ``input_ids``, ``attention_mask``,
        from a streaming task ``reset`` (rows that start a new document), and the batch's
        ``extras`` (a dict of tensors a data task adds for the layers that read them, such
        as retrieved neighbours), passed on unchanged."""
        return ModelInputs(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), reset=batch.get("reset"),
            extras=dict(batch.get("extras") or {}),  # type: ignore[call-overload]
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (batch, length, vocab) from hidden states, for generation.
        Objectives without a token head leave it unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} has no token head")

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        """Tokens the batch contributes to throughput: ``int(self.count_tokens(batch))``."""
        return int(self.count_tokens(batch))

    def count_tokens(self, batch: dict[str, Tensor]) -> Tensor | int:
        """What :meth:`tokens_in` counts, as an integer or a 0-d tensor on the batch's device:
        the throughput callback adds these up on the device and reads the sum only when it
        logs, so counting needs no wait for the device at every step. Override this one (an
        objective that overrides only :meth:`tokens_in` is counted with it). By default the
        tokens ``attention_mask`` marks, else every input token."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else batch["input_ids"].numel()

    def examples_in(self, batch: dict[str, Tensor]) -> int:
        """Examples in the batch (the weight of its metrics in epoch averages)."""
        return int(batch["input_ids"].shape[0])


class _LightningDataModuleSlot:
    """The base of :class:`DataTask` until Lightning is imported (see :func:`_as_lightning_data_module`)."""


def _as_lightning_data_module() -> None:
    """Make :class:`DataTask` (and with it every data task class) a subclass of Lightning's
    ``LightningDataModule``. Done when the first data task is created, not when plugins are
    loaded: importing Lightning costs seconds, and ``plugformer plugins``, ``--help`` or a
    config error must not wait for it."""
    if DataTask.__bases__ == (_LightningDataModuleSlot,):
        import lightning.pytorch as pl

        DataTask.__bases__ = (pl.LightningDataModule,)


class DataTask(_LightningDataModuleSlot):
    """A Lightning data module that also tells the model what it needs to know (it is a
    ``lightning.pytorch.LightningDataModule`` from the moment the first task is created).

    Contract: :meth:`prepare` builds or loads the cached Hugging Face ``datasets`` splits and
    the tokenizer; after it, ``vocab_size`` and ``max_length`` (longest batch length) are set,
    and ``facts`` holds what the objective needs to know about the task (``num_classes``
    for classification); the core passes ``facts`` to model factories as ``ctx.task``
    without reading it. ``streams`` says that batches are ordered segments: row i of a batch
    continues row i of the previous one (no shuffling), so a stateful model may carry its
    state across batches. The loaders yield dicts in the format the objective consumes.
    """

    vocab_size: int
    max_length: int
    pad_id: int = 0
    streams: bool = False

    @property
    def facts(self) -> dict[str, Any]:
        """Task facts for the objective (after :meth:`prepare`); none by default."""
        return {}

    def __new__(cls, *args: Any, **kwargs: Any) -> DataTask:
        _as_lightning_data_module()
        return super().__new__(cls)

    def prepare(self) -> None:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's transfer, after noting on the host which boolean tensors of the batch
        (its padding masks) are all True, so the model skips the padding path without waiting
        for the device (:func:`plugformer.masks.all_true`). A task that overrides this should
        call it."""
        from plugformer.masks import all_true_on_host, mark_all_true

        known = all_true_on_host(batch)
        return mark_all_true(super().transfer_batch_to_device(batch, device, dataloader_idx), known)  # type: ignore[misc]


def default_positions(length: int, device: torch.device | str | None = None) -> Tensor:
    """Positions 0..length-1 shared by every example: (1, length)."""
    return torch.arange(length, device=device)[None, :]


def batch_token_count(objective: Objective, batch: dict[str, Tensor]) -> Tensor | int:
    """The objective's token count of a batch, as :meth:`Objective.count_tokens` gives it, or
    from :meth:`Objective.tokens_in` when the objective overrides that one below (an
    objective written before ``count_tokens`` existed)."""
    if _counts_with_tokens_in(type(objective)):
        return objective.tokens_in(batch)
    return objective.count_tokens(batch)


@functools.cache
def _counts_with_tokens_in(cls: type) -> bool:
    for klass in cls.__mro__:
        if "count_tokens" in vars(klass):
            return False
        if "tokens_in" in vars(klass):
            return True
    return False
