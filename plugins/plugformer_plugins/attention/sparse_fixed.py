"""Fixed sparse attention (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", the fixed pattern with both factors merged in every head).

The sequence is cut into blocks of ``block`` (l) positions; the last ``summary`` (c)
positions of every block are its summary. Which keys a query at index i sees (indices in the
sequence, not values of ``positions``):

- causal: j ≤ i in its own block, and the summary positions of every earlier block;
- bidirectional: its whole block, and the summary positions of every block.

A query sees l + c·n/l keys at most, so time and memory grow as n·(l + c·n/l): O(n·√n) with
l ≈ √n and c fixed, as in the paper. The local part is computed block by block; the summary
keys (n/l · c of them) are gathered once and shared by all queries, with one softmax over both
parts. Padded keys are never seen; a query that sees no key returns zeros. The position's
score bias and relative terms are computed from the gathered positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks
from plugformer_plugins.attention.sparse_common import SparseAttention, blocks


@dataclass
class FixedSparseConfig:
    """``block``: l in the paper, the block length; ``summary``: c, how many positions at the
    end of each block every later query sees (1 ≤ summary ≤ block)."""

    block: int = field(default=64, metadata=bounds(ge=1))
    summary: int = field(default=8, metadata=bounds(ge=1))
    bias: bool = True


class FixedSparseAttention(SparseAttention):
    """The fixed pattern over (batch, heads, length, head_dim); see the module docstring."""

    def __init__(self, config: FixedSparseConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, stride=config.block, bias=config.bias, option="block")
        if not 1 <= config.summary <= config.block:
            raise ConfigError(
                f"model.attention.summary={config.summary} with model.attention.block={config.block} for sparse_fixed.",
                expected="1 ≤ summary ≤ block (the summary is the end of each block)",
                fix="lower model.attention.summary or raise model.attention.block",
            )
        self.summary = config.summary

    def sees(self, query: Tensor, key: Tensor) -> Tensor:
        l, c = self.stride, self.summary
        pattern = (query // l == key // l) | (key % l >= l - c)
        return pattern & (key <= query) if self.causal else pattern

    def key_indices(self, query: Tensor) -> tuple[Tensor, Tensor]:
        l, c = self.stride, self.summary
        device = query.device
        block = query // l
        local = block[:, None] * l + torch.arange(l, device=device)
        local_real = local <= query[:, None]
        earlier = int(block.max())
        owner = torch.arange(earlier, device=device).repeat_interleave(c)
        summaries = owner * l + (l - c) + torch.arange(c, device=device).repeat(earlier)
        index = torch.cat([torch.where(local_real, local, 0), summaries.expand(len(query), -1)], dim=1)
        real = torch.cat([local_real, owner[None, :] < block[:, None]], dim=1)
        return index, real

    def blockwise(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, positions: Tensor) -> Tensor:
        l, c = self.stride, self.summary
        n_blocks = q.shape[-2] // l
        q_blocks, k_blocks, v_blocks = (ChunkSource(blocks(t, -2, l)) for t in (q, k, v))  # (b, h, nb, l, hd)
        pos_blocks, valid_blocks = blocks(positions, -1, l), blocks(valid, -1, l)  # (P or B, nb, l)
        owner = torch.arange(n_blocks, device=q.device).repeat_interleave(c)
        sum_valid = valid_blocks[..., l - c :].flatten(-2)[:, None, None, None, :]  # (B, 1, 1, 1, nb·c)
        pos_sum_all = pos_blocks[..., l - c :].flatten(-2).unsqueeze(-2)  # (P, 1, nb·c)
        inside = torch.ones(l, l, dtype=torch.bool, device=q.device)
        inside = inside.tril() if self.causal else inside

        def chunk(first: int, last: int) -> Tensor:
            """Query blocks first ≤ a < last: (b, h, last − first, l, hd)."""
            count = last - first
            q_part, pos_part = q_blocks.narrow(2, first, count), pos_blocks[:, first:last]
            # Local part: within each block.
            near_allowed = inside & valid_blocks[:, None, first:last, None, :]  # (B, 1, nc, l, l)
            near_scores = self.scores(q_part, k_blocks.narrow(2, first, count), pos_part, pos_part)

            # Summary part: the last c positions of every block, shared by all queries.
            k_sum, v_sum = (t.narrow(3, l - c, c).flatten(-3, -2).unsqueeze(2) for t in (k_blocks, v_blocks))  # (b, h, 1, nb·c, hd)
            pos_sum = pos_sum_all.expand(-1, count, -1)  # (P, nc, nb·c)
            a = torch.arange(first, last, device=q.device)[:, None]
            order = (owner[None, :] < a) if self.causal else (owner[None, :] != a)  # (nc, nb·c)
            far_allowed = order[:, None, :] & sum_valid  # (B, 1, nc, 1, nb·c)
            far_scores = self.scores(q_part, k_sum, pos_part, pos_sum)  # (b, h, nc, l, nb·c)

            (near_weights, far_weights), seen = self.joint_softmax(
                [near_scores, far_scores], [near_allowed, far_allowed], v.dtype
            )
            out = self.weighted(near_weights, v_blocks.narrow(2, first, count), pos_part, pos_part)
            out = out + self.weighted(far_weights, v_sum, pos_part, pos_sum)
            return out.masked_fill(~seen, 0.0)

        # A few query blocks at a time, recomputed in backward: no (n × (l + c·n/l)) scores kept.
        step = chunk_count(n_blocks, q[..., :1, :1].numel() * l * (l + c * n_blocks), slices=q[..., :1, :1].numel())
        return recomputed_chunks(chunk, n_blocks, step, dim=-3).flatten(-3, -2)


COMPONENT = Component(
    kind="attention",
    name="sparse_fixed",
    factory=FixedSparseAttention,
    config=FixedSparseConfig,
    summary="Sparse Transformer fixed pattern: within blocks of l plus the last c positions of every block, in O(n·(l + c·n/l)).",
    reference="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms", "incremental_decoding"},
        # n·(l + c·n/l) keys per sequence: O(n·√n) with the paper's l ≈ √n, not linear.
        cost="n·√n",
    ),
)
