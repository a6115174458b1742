"""Contracts of the component kinds: the base classes and build contexts plugins build on.

Shapes: ``x`` is (batch, length, d_model); inside attention, q/k/v are
(batch, heads, length, head_dim); ``mask`` is a key padding mask (batch, length), True for
real tokens; ``positions`` is a LongTensor (length,) of token positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BuildContext:
    """What a model component's factory may read: the model's sizes and its neighbours.

    ``causal`` says whether the model is a decoder; ``position`` is the run's position
    component (attention factories pass it to :class:`Attention`); ``token_embedding`` is the
    input embedding (objectives tie their head to it); ``num_classes`` is set for
    classification tasks.
    """

    d_model: int
    n_heads: int
    n_layers: int
    dropout: float
    causal: bool
    max_length: int
    vocab_size: int
    layer_index: int = 0
    num_classes: int | None = None
    position: PositionEncoding | None = field(default=None, compare=False)
    token_embedding: nn.Embedding | None = field(default=None, compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class DataContext:
    """What a data task's factory may read: where to cache and the run's seed."""

    cache_dir: Path
    seed: int = 0


def mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    """Mark the last projection of a residual branch, initialized smaller with depth (GPT-2)."""
    linear.scale_init_by_depth = True  # type: ignore[attr-defined]
    return linear


class PositionEncoding(nn.Module):
    """A position component contributes any of three things; the defaults contribute nothing.

    - :meth:`embed`: embeddings added to the token embeddings at the input;
    - :meth:`transform_qk`: a transform of queries and keys inside attention (rotary);
    - :meth:`score_bias`: an additive bias on attention scores (ALiBi, T5, Shaw).
    """

    def embed(self, positions: Tensor) -> Tensor | None:
        """(length, d_model) added to the input embeddings, or None."""
        return None

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Transformed (q, k), both (batch, heads, length, head_dim)."""
        return q, k

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Bias (heads, ..., len(q_positions), len(k_positions)) for any two position tensors
        of shapes (..., Lq) and (..., Lk), or None. Blockwise attention calls it per block, so
        it must not assume full sequences."""
        return None


class Attention(nn.Module):
    """Multi-head self-attention with shared q/k/v and output projections.

    Subclasses implement :meth:`attend` on (batch, heads, length, head_dim) tensors; the base
    applies the position's query/key transform first and offers :meth:`score_bias`.
    ``forward(x, *, mask, positions)`` returns a tensor of x's shape.
    """

    def __init__(self, ctx: BuildContext, *, bias: bool = True) -> None:
        super().__init__()
        if ctx.d_model % ctx.n_heads:
            raise ValueError(f"d_model={ctx.d_model} is not divisible by n_heads={ctx.n_heads}")
        self.n_heads = ctx.n_heads
        self.head_dim = ctx.head_dim
        self.causal = ctx.causal
        self.dropout = ctx.dropout
        self.qkv = nn.Linear(ctx.d_model, 3 * ctx.d_model, bias=bias)
        self.out = mark_residual_projection(nn.Linear(ctx.d_model, ctx.d_model, bias=bias))
        # The position module belongs to the model; keep a reference without re-registering it.
        self.__dict__["position"] = ctx.position

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        context: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        if context is not None or cache is not None:
            raise NotImplementedError(f"{type(self).__name__} supports neither cross-attention nor a cache")
        batch, length, d_model = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.transform_qk(q, k, positions)
        out = self.attend(q, k, v, key_padding_mask=mask, positions=positions)
        return self.out(out.transpose(1, 2).reshape(batch, length, d_model))

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The position's query/key transform; an attention may override where it applies it."""
        return self.position.transform_qk(q, k, positions) if self.position is not None else (q, k)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """The position's additive score bias for these positions, or None."""
        return self.position.score_bias(q_positions, k_positions) if self.position is not None else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, positions: Tensor) -> Tensor:
        """(batch, heads, length, head_dim) → same shape, honouring ``self.causal`` and the mask."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


class FeedForward(nn.Module):
    """A position-wise sublayer (batch, length, d_model) → same shape.

    :meth:`aux_losses` reports auxiliary losses of the last forward pass (MoE balance, z-loss),
    already weighted; the training loop adds them to the objective's loss.
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


class Objective(nn.Module):
    """Owns the head and turns the backbone's hidden states into a loss and metrics.

    Whether the model is a decoder or an encoder follows from the objective's capabilities
    (``requires={"attention": {"causal"}}`` or ``{"bidirectional"}``). ``forward(hidden,
    batch)`` returns an :class:`ObjectiveOutput`; ``batch`` is the data task's collated dict.
    ``tokens_in(batch)`` counts the tokens a batch contributes to throughput.
    """

    def forward(self, hidden: Tensor, batch: dict[str, Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

    @staticmethod
    def tokens_in(batch: dict[str, Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class DataTask(pl.LightningDataModule):
    """A Lightning data module that also tells the model what it needs to know.

    Contract: :meth:`prepare` builds or loads the cached Hugging Face ``datasets`` splits and
    the tokenizer; after it, ``vocab_size``, ``max_length`` (longest batch length) and, for
    classification, ``num_classes`` are set, and :meth:`train_dataloader` /
    :meth:`val_dataloader` yield dicts with ``input_ids`` (batch, length), ``attention_mask``
    (batch, length, bool) and ``labels``.
    """

    vocab_size: int
    max_length: int
    num_classes: int | None = None
    pad_id: int = 0

    def prepare(self) -> None:
        raise NotImplementedError
