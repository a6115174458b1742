"""Transformer-XL's relative positions (Dai et al. 2019, "Transformer-XL: Attentive Language
Models Beyond a Fixed-Length Context").

No input embeddings. The score of query i and key j (positions p_i and p_j, distance
r = p_i − p_j) is, before the 1/√d scaling,

    A_ij = q_iᵀk_j  (a)  +  q_iᵀW_R R_r  (b)  +  uᵀk_j  (c)  +  vᵀW_R R_r  (d),

with R_r the sinusoidal embedding (d_model wide) of the signed distance r, W_R a per-layer
projection to the heads and u, v learned per-head vectors (shared by the layers, as in the
paper, or per layer with ``untie_biases``). In the position contract this is:

- :meth:`XLRelativeLayer.transform_qk`: q ← q + u, keys unchanged, so the attention's own
  q·k gives (a) + (c) and a key/value cache holds plain keys;
- :meth:`XLRelativeLayer.relative_scores` for the transformed q: (q + u + (v − u))·W_R R_r /√d
  = (b) + (d).

The "relative shift" of the paper (pad, reshape, slice) turns a table of scores per distance
into scores per (query, key) pair under the assumption that keys are the consecutive tokens
before the queries. Here the table (one score per distance in [−k, k], k = ``max_distance``)
is gathered by each pair's actual distance p_i − p_j, so it is exact for any positions:
memories, per-example offsets, blocks. Distances beyond ±k use R_{±k} (the table's edge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, PositionEncoding, bounds


@dataclass
class XLRelativeConfig:
    """``max_distance``: k, the distances with their own embedding are −k..k (larger ones share
    the edge's); the per-distance table costs Lq·(2k + 1)·head_dim per head, so keep k near the
    longest memory + segment. ``untie_biases``: u and v per layer instead of shared."""

    max_distance: int = field(default=512, metadata=bounds(ge=1))
    untie_biases: bool = False


def sinusoid(distances: Tensor, width: int) -> Tensor:
    """(n, width) sinusoidal embeddings of the (signed) ``distances`` (n,): sines then cosines of
    distance·10000^(−2k/width), as in Transformer-XL's R."""
    inverse = 1.0 / (10000.0 ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
    angles = distances.float()[:, None] * inverse[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :width]


class XLBiases(nn.Module):
    """The per-head content bias u and position bias v, (heads, head_dim) each."""

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.v = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)


class XLRelativeLayer(PositionEncoding):
    """One layer's view: its W_R and the (shared or own) biases.

    Contract: ``transform_qk(q, k, positions)`` returns (q + u, k); ``relative_scores(q, ...)``
    expects that transformed q (batch, heads, ..., Lq, head_dim) and returns
    (q − u + v)·W_R R_{p_i − p_j} / √head_dim, (batch, heads, ..., Lq, Lk), in at least float32."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, max_distance: int, biases: XLBiases | None) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.n_heads, self.head_dim = n_heads, head_dim
        self.r_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # W_{k,R}
        if biases is None:
            self.biases = XLBiases(n_heads, head_dim)
        else:  # shared: owned by the stack's module, referenced here without registering it again
            self.__dict__["biases"] = biases
        distances = torch.arange(-max_distance, max_distance + 1)
        self.register_buffer("embeddings", sinusoid(distances, d_model), persistent=False)

    def _per_head(self, vector: Tensor, like: Tensor) -> Tensor:
        """(heads, head_dim) → broadcastable to ``like`` (batch, heads, ..., L, head_dim)."""
        return vector.view(1, vector.shape[0], *([1] * (like.dim() - 3)), vector.shape[1]).to(like.dtype)

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return q + self._per_head(self.biases.u, q), k

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)
        heads = q.shape[1]
        projected = self.r_proj(self.embeddings.to(self.r_proj.weight.dtype))  # (2k + 1, heads·head_dim)
        projected = projected.view(-1, self.n_heads, self.head_dim)[:, :heads].permute(1, 2, 0).to(dtype)
        biases = self.biases
        shifted = q.to(dtype) + self._per_head((biases.v - biases.u)[:heads], q).to(dtype)
        table_shape = (1, heads, *([1] * (q.dim() - 4)), self.head_dim, projected.shape[-1])
        per_distance = torch.matmul(shifted, projected.reshape(table_shape)) / math.sqrt(self.head_dim)
        distance = q_positions[..., :, None] - k_positions[..., None, :]
        index = (distance.clamp(-self.max_distance, self.max_distance) + self.max_distance).unsqueeze(1)
        index = index.expand(*q.shape[:-1], index.shape[-1])
        return per_distance.gather(-1, index)


class XLRelativePosition(PositionEncoding):
    """The stack's XL positions: one :class:`XLRelativeLayer` per layer (its W_R), with u and v
    shared by all layers unless ``untie_biases``. Called directly, it acts as layer 0."""

    def __init__(self, config: XLRelativeConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.n_layers = ctx.n_layers
        shared = None if config.untie_biases else XLBiases(ctx.n_heads, ctx.head_dim)
        if shared is not None:
            self.biases = shared
        self.layers = nn.ModuleList(
            XLRelativeLayer(ctx.d_model, ctx.n_heads, ctx.head_dim, config.max_distance, shared) for _ in range(ctx.n_layers)
        )

    def for_layer(self, index: int) -> XLRelativeLayer:
        if not 0 <= index < self.n_layers:
            raise IndexError(f"xl_relative position: layer {index} of a stack of {self.n_layers} layers")
        return self.layers[index]

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.layers[0].transform_qk(q, k, positions)

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        return self.layers[0].relative_scores(q, q_positions, k_positions)


COMPONENT = Component(
    kind="position",
    name="xl_relative",
    factory=XLRelativePosition,
    config=XLRelativeConfig,
    summary="Transformer-XL relative positions: projected sinusoidal distance embeddings with the u and v biases.",
    reference="Dai et al. 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context",
    capabilities=Capabilities(
        provides={"relative_terms", "qk_transform", "length_extrapolation"},
        requires={"attention": {"relative_terms", "qk_transform"}},
    ),
)
