"""Relative position representations (Shaw et al. 2018, "Self-Attention with Relative Position
Representations").

Each layer learns two tables of head_dim-vectors, a^K and a^V, indexed by the relative distance
j − i clipped to [−k, k] (k = ``max_distance``), shared across heads. Attention becomes

    e_ij = q_i · (k_j + a^K_ij) / √d,        z_i = Σ_j α_ij (v_j + a^V_ij),

so this position contributes :meth:`relative_scores` q_i · a^K_ij / √d and
:meth:`relative_values` Σ_j α_ij a^V_ij. Neither materializes an (Lq, Lk, head_dim) tensor:
the scores are q @ a^Kᵀ over the 2k + 1 distances, gathered by each pair's distance; the
values scatter-add the weights into the 2k + 1 distances, then multiply by a^V.

Per layer as in the paper (:meth:`ShawPosition.for_layer` returns layer i's tables), or one
pair of tables for every layer with ``share_layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, PositionEncoding, bounds


@dataclass
class ShawConfig:
    """``max_distance``: k, relative distances are clipped to [−k, k]. ``share_layers``: one
    pair of tables for all layers instead of one per layer."""

    max_distance: int = field(default=16, metadata=bounds(ge=1))
    share_layers: bool = False


class ShawTables(PositionEncoding):
    """One layer's a^K and a^V: (2k + 1, head_dim) each, row r for the distance r − k.

    Contract: ``relative_scores(q, q_positions, k_positions)`` with q (batch, heads, ..., Lq,
    head_dim) and positions (batch or 1, ..., Lq) / (batch or 1, ..., Lk) returns q·a^K/√d
    (batch, heads, ..., Lq, Lk); ``relative_values(weights, ...)`` with weights (batch, heads,
    ..., Lq, Lk) returns Σ_j α_ij a^V_ij (batch, heads, ..., Lq, head_dim). Both in at least
    float32, and functions of the position values only (blockwise attentions call them per
    block)."""

    def __init__(self, max_distance: int, head_dim: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.key_table = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))
        self.value_table = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.key_table, mean=0.0, std=0.02)
        nn.init.normal_(self.value_table, mean=0.0, std=0.02)

    def _index(self, q_positions: Tensor, k_positions: Tensor, leading: torch.Size) -> Tensor:
        """Table rows (``leading`` + (Lk,)) of each query–key pair: clip(j − i, −k, k) + k,
        broadcast over the heads (and the batch, when the positions are shared)."""
        distance = k_positions[..., None, :] - q_positions[..., :, None]
        rows = (distance.clamp(-self.max_distance, self.max_distance) + self.max_distance).unsqueeze(1)
        return rows.expand(*leading, rows.shape[-1])

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)
        per_distance = torch.matmul(q.to(dtype), self.key_table.to(dtype).t()) / math.sqrt(q.shape[-1])
        return per_distance.gather(-1, self._index(q_positions, k_positions, q.shape[:-1]))

    def relative_values(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        dtype = torch.promote_types(weights.dtype, torch.float32)
        index = self._index(q_positions, k_positions, weights.shape[:-1])
        per_distance = weights.new_zeros(*weights.shape[:-1], self.key_table.shape[0], dtype=dtype)
        per_distance = per_distance.scatter_add(-1, index, weights.to(dtype))
        return torch.matmul(per_distance, self.value_table.to(dtype))


class ShawPosition(PositionEncoding):
    """The stack's tables, one :class:`ShawTables` per layer (or one shared): the attention of
    layer i sees ``for_layer(i)``. Called directly, it acts as layer 0."""

    def __init__(self, config: ShawConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.n_layers = ctx.n_layers
        self.share_layers = config.share_layers
        count = 1 if config.share_layers else ctx.n_layers
        self.layers = nn.ModuleList(ShawTables(config.max_distance, ctx.head_dim) for _ in range(count))

    def for_layer(self, index: int) -> ShawTables:
        if not 0 <= index < self.n_layers:
            raise IndexError(f"shaw position: layer {index} of a stack of {self.n_layers} layers")
        return self.layers[0 if self.share_layers else index]

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return self.layers[0].relative_scores(q, q_positions, k_positions)

    def relative_values(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return self.layers[0].relative_values(weights, q_positions, k_positions)


COMPONENT = Component(
    kind="position",
    name="shaw",
    factory=ShawPosition,
    config=ShawConfig,
    summary="Shaw relative positions: learned per-layer key and value embeddings of clipped query–key distances.",
    reference="Shaw et al. 2018, Self-Attention with Relative Position Representations",
    capabilities=Capabilities(provides={"relative_terms", "length_extrapolation"}, requires={"attention": {"relative_terms"}}),
)
