"""Strided sparse attention (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", the strided pattern with both factors merged in every head).

Which keys a query at index i sees (indices in the sequence, not values of ``positions``),
with ``stride`` l:

- causal: j ≤ i with i − j < l (its local block: the previous l positions, itself included)
  or i − j a multiple of l (every l-th earlier position);
- bidirectional: |i − j| < l, or i − j a multiple of l on either side.

A query sees about 2l + n/l keys (causal: l + i/l), so time and memory grow as
n·(l + n/l): O(n·√n) with l ≈ √n, as in the paper. The local part is computed by blocks of
l queries over their own and the previous block (and the next one when bidirectional); the
strided part by splitting the sequence into its l residues modulo l, in each of which it is
plain (causal) attention over n/l positions. Both parts share one softmax. Padded keys are
never seen; a query that sees no key returns zeros. The position's score bias and relative
terms are computed from the gathered positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks
from plugformer_plugins.attention.sparse_common import SparseAttention, blocks, windows_of


@dataclass
class StridedSparseConfig:
    """``stride``: l in the paper, the local window and the step of the strided keys; about
    √length balances the two parts."""

    stride: int = field(default=64, metadata=bounds(ge=1))
    bias: bool = True


class StridedSparseAttention(SparseAttention):
    """The strided pattern over (batch, heads, length, head_dim); see the module docstring."""

    def __init__(self, config: StridedSparseConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, stride=config.stride, bias=config.bias, option="stride")

    def sees(self, query: Tensor, key: Tensor) -> Tensor:
        distance = query - key
        pattern = (distance.abs() < self.stride) | (distance % self.stride == 0)
        return pattern & (distance >= 0) if self.causal else pattern

    def key_indices(self, query: Tensor) -> tuple[Tensor, Tensor]:
        steps = int(query.max()) // self.stride
        local = query[:, None] - torch.arange(self.stride, device=query.device)
        far = query[:, None] - self.stride * torch.arange(1, steps + 1, device=query.device)
        index = torch.cat([local, far], dim=1)
        real = index >= 0
        return index.clamp(min=0), real

    def blockwise(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, positions: Tensor) -> Tensor:
        l = self.stride
        ahead = 0 if self.causal else 1
        n_blocks = q.shape[-2] // l
        batch_heads = q.shape[0] * q.shape[1]
        # One gradient buffer per tensor, read in pieces by every chunk (see ChunkSource).
        q, k, v = (ChunkSource(t) for t in (q, k, v))
        q_blocks, pos_blocks = q.view(lambda t: blocks(t, -2, l)), blocks(positions, -1, l)  # (b, h, nb, l, hd), (P, nb, l)
        k_cols, v_cols = (t.view(lambda x: blocks(x, -2, l).transpose(-3, -2)) for t in (k, v))  # (b, h, l, nb, hd)
        pos_cols = pos_blocks.transpose(-1, -2)  # (P, l, nb)

        def chunk(first: int, last: int) -> Tensor:
            """Query blocks first ≤ a < last: (b, h, last − first, l, hd)."""
            # Local part: block c of queries against blocks c − 1, c (and c + 1).
            q_part, pos_part = q_blocks.narrow(2, first, last - first), pos_blocks[:, first:last]
            k_near = windows_of(k, -2, l, 1, ahead, 0.0, first, last).transpose(-1, -2)  # (b, h, nc, span, hd)
            v_near = windows_of(v, -2, l, 1, ahead, 0.0, first, last).transpose(-1, -2)
            pos_near = windows_of(positions, -1, l, 1, ahead, 0, first, last)  # (P, nc, span)
            span = k_near.shape[-2]
            # i − j for query row t and key slot s of the same block: t + l − s.
            distance = torch.arange(l, device=q.device)[:, None] + l - torch.arange(span, device=q.device)[None, :]
            band = ((distance >= 0) & (distance < l)) if self.causal else (distance.abs() < l)
            near_valid = windows_of(valid, -1, l, 1, ahead, False, first, last)
            near_allowed = band & near_valid[:, None, :, None, :]  # (B, 1, nc, l, span)
            near_scores = self.scores(q_part, k_near, pos_part, pos_near)

            # Strided part: residue r's positions r, l + r, 2l + r, … form one short sequence
            # (b, h, l, nb, ·), in which query block a sees key blocks a' < a (a' ≠ a).
            q_cols, q_pos_cols = q_part.transpose(-3, -2), pos_part.transpose(-1, -2)  # (b, h, l, nc, hd), (P, l, nc)
            a = torch.arange(n_blocks, device=q.device)
            mine = a[first:last, None]
            order = (a[None, :] < mine) if self.causal else (a[None, :] != mine)  # (nc, nb)
            far_allowed = order[:, None, :] & blocks(valid, -1, l).transpose(-1, -2)[:, None, None]  # (B, 1, nc, l, nb)
            far_scores = self.scores(q_cols, k_cols, q_pos_cols, pos_cols).transpose(-3, -2)  # (b, h, nc, l, nb)

            (near_weights, far_weights), seen = self.joint_softmax(
                [near_scores, far_scores], [near_allowed, far_allowed], v.dtype
            )
            out = self.weighted(near_weights, v_near, pos_part, pos_near)
            out = out + self.weighted(far_weights.transpose(-3, -2), v_cols, q_pos_cols, pos_cols).transpose(-3, -2)
            return out.masked_fill(~seen, 0.0)

        # A few query blocks at a time, recomputed in backward: no (n × (l + n/l)) scores kept.
        step = chunk_count(n_blocks, batch_heads * l * ((2 + ahead) * l + n_blocks), slices=batch_heads)
        return recomputed_chunks(chunk, n_blocks, step, dim=-3).flatten(-3, -2)


COMPONENT = Component(
    kind="attention",
    name="sparse_strided",
    factory=StridedSparseAttention,
    config=StridedSparseConfig,
    summary="Sparse Transformer strided pattern: the previous l positions and every l-th one, blockwise in O(n·(l + n/l)).",
    reference="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms", "incremental_decoding"},
        # n·(l + n/l) keys per sequence: O(n·√n) with the paper's l ≈ √n, not linear.
        cost="n·√n",
    ),
)
