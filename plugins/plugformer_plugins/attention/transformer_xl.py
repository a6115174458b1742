"""Transformer-XL's segment-level recurrence (Dai et al. 2019, "Transformer-XL: Attentive
Language Models Beyond a Fixed-Length Context").

Each layer keeps a memory of the last ``mem_len`` hidden states it received (its attention
input) from earlier segments of the same stream. A segment's queries come from the segment;
its keys and values are projected from [memory; segment] with the layer's current weights,
and attention is causal over that concatenation (query i of the segment is key n + i of it,
n the memory's length). The memory is stored with a stop-gradient, SG(h_{τ−1}) in the
paper: a segment's loss trains the key/value projections through the memory's keys, never
the earlier segment's activations.

The memory lives in the state the attention makes for a stream
(``new_state(batch, streaming=True)``): the training module carries it from batch to batch
of a data task that ``streams`` ordered segments, detaches it between steps and resets rows
where a new document starts (their memory becomes invisible). Memory tokens get the positions
just before the segment's first position (p₀ − n … p₀ − 1), so a relative position component
(``model/position=xl_relative``: the paper's R, u, v) measures distances across the boundary.

Without a streaming state (shuffled batches, the conformance kit) the layer is causal full
attention over the segment, and for decoding it keeps a plain key/value cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import AttentionState, BuildContext, Capabilities, Component, bounds
from plugformer_plugins.attention.full import FullAttention, FullAttentionConfig


@dataclass
class TransformerXLConfig:
    """``mem_len``: hidden states each layer remembers from earlier segments (0: none)."""

    mem_len: int = field(default=128, metadata=bounds(ge=0))
    bias: bool = True


@dataclass
class SegmentMemory(AttentionState):
    """The last ``limit`` hidden states (batch, n, d_model) a layer saw, detached, with their
    mask (batch, n), True for real tokens. Every row holds the same number n of tokens."""

    limit: int
    hidden: Tensor | None = None
    mask: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.hidden is None else self.hidden.shape[1]

    def push(self, hidden: Tensor, mask: Tensor | None, *, multiple: int = 1) -> tuple[Tensor, Tensor] | None:
        """Append ``hidden`` (batch, L, d_model) with its mask (None: all real), detached; keep
        the last ``limit`` tokens and return the oldest ones pushed out (with their mask), or
        None. ``multiple``: push out a multiple of this many tokens only (the rest stays, so
        the memory may hold up to ``limit + multiple − 1``)."""
        hidden = hidden.detach()
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.hidden is not None:
            hidden = torch.cat([self.hidden, hidden.to(self.hidden.dtype)], dim=1)
            mask = torch.cat([self.mask, mask.bool()], dim=1)
        excess = hidden.shape[1] - self.limit
        evict = (excess // multiple) * multiple if excess > 0 else 0
        self.hidden, self.mask = hidden[:, evict:], mask[:, evict:].bool()
        return (hidden[:, :evict], mask[:, :evict].bool()) if evict else None

    def reorder(self, index: Tensor) -> None:
        if self.hidden is not None:
            self.hidden, self.mask = self.hidden[index], self.mask[index]

    def detach(self) -> None:
        if self.hidden is not None:
            self.hidden = self.hidden.detach()

    def reset(self, rows: Tensor) -> None:
        if self.mask is not None:
            self.mask = self.mask & ~rows.to(self.mask.device)[:, None]


class TransformerXLAttention(FullAttention):
    """Causal softmax attention over [memory; segment] when given a :class:`SegmentMemory`
    (from ``new_state(batch, streaming=True)``); plain full attention otherwise."""

    def __init__(self, config: TransformerXLConfig, ctx: BuildContext) -> None:
        super().__init__(FullAttentionConfig(bias=config.bias), ctx)
        self.mem_len = config.mem_len

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        if streaming and not self.cross:
            return SegmentMemory(limit=self.mem_len) if self.mem_len > 0 else None
        return super().new_state(batch_size, streaming=streaming)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None, state=None, **kwargs) -> Tensor:
        if not isinstance(state, SegmentMemory):
            return super().forward(x, mask=mask, positions=positions, state=state, **kwargs)
        out = self.attend_with_memory(x, mask, positions, state.hidden, state.mask)
        state.push(x, mask)
        return out

    def attend_with_memory(
        self, x: Tensor, mask: Tensor | None, positions: Tensor | None, memory: Tensor | None, memory_mask: Tensor | None
    ) -> Tensor:
        """The layer's output for segment ``x`` (batch, L, d_model) whose queries also see
        ``memory`` (batch, n, d_model; None: nothing), the tokens just before it."""
        batch, length, _ = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        if positions.dim() == 1:
            positions = positions[None, :]
        n = 0 if memory is None else memory.shape[1]
        q = self.query(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        inputs = x if n == 0 else torch.cat([memory.to(x.dtype), x], dim=1)
        k, v = self._split_kv(self.key_value(inputs))
        k_positions = positions
        if n:
            before = positions[:, :1] - n + torch.arange(n, device=x.device)[None, :]
            k_positions = torch.cat([before, positions], dim=1)
            # The position's transform acts per token; queries for the memory are placeholders.
            q = torch.cat([q.new_zeros(batch, self.n_heads, n, self.head_dim), q], dim=2)
        q, k = self.transform_qk(q, k, k_positions)
        q = q[:, :, n:]
        key_mask = None if mask is None else mask.bool()
        if n:
            if memory_mask is None:
                memory_mask = torch.ones(batch, n, dtype=torch.bool, device=x.device)
            segment_mask = key_mask if key_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
            key_mask = torch.cat([memory_mask, segment_mask], dim=1)
        out = self.attend(q, k, v, key_padding_mask=key_mask, q_positions=positions, k_positions=k_positions)
        return self.out(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


CAPABILITIES = Capabilities(
    provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms", "incremental_decoding"},
    cost="quadratic",
)

COMPONENT = Component(
    kind="attention",
    name="transformer_xl",
    factory=TransformerXLAttention,
    config=TransformerXLConfig,
    summary="Transformer-XL: causal attention over a stop-gradient memory of the previous segments' hidden states.",
    reference="Dai et al. 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context",
    capabilities=CAPABILITIES,
)
