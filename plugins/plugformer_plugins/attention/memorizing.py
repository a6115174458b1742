"""Memorizing Transformer attention (Wu et al. 2022, "Memorizing Transformers"): local causal
attention plus top-k attention over a non-differentiable external memory of the (key, value)
pairs of earlier segments of the same document, mixed per head by a learned gate
g = σ(b_h): out = g·retrieved + (1 − g)·local.

The memory exists when the model streams ordered segments (``new_state(streaming=True)``:
the training module and ``plugformer eval`` carry it across the batches of a data task that
``streams``). Each batch row has its own memory (one document per row), cleared when the data
marks the row's document as new (``reset``), holding at most ``memory_size`` tokens (the
oldest are evicted first). The formula holds as written when nothing is retrieved (an
ordinary batch without a memory, or a row whose memory is still empty): the retrieved term
is zero and the output is (1 − g)·local, so the layer computes one function whether or not a
memory is attached, as at the first segment of every document in training.

Retrieval is exact maximum-inner-product search with faiss: one ``IndexFlatIP`` per batch row
and head. Per-row indexes rather than one index with row ids because rows are reset and
evicted independently (a flat index is rebuilt from the row's kept keys in O(n), with no
id bookkeeping) and a search never has to filter other documents' keys out. The inner
product is the attention logit itself, so the k retrieved keys are exactly the k largest
logits in the memory. The memory holds detached float32 copies on the CPU, so no gradient
reaches an earlier segment; gradients reach the queries and the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import (
    Attention, AttentionState, BuildContext, Capabilities, Component, allowed_keys, bounds, set_weight_decay,
)


@dataclass
class MemorizingAttentionConfig:
    memory_size: int = field(default=2048, metadata=bounds(ge=1))  # tokens kept per row (FIFO)
    top_k: int = field(default=32, metadata=bounds(ge=1))  # keys retrieved per query and head
    gate_init: float = 0.0  # b_h at the start: σ(0) = 0.5
    bias: bool = True


class KnnMemory(AttentionState):
    """Per batch row: the keys and values (heads, n, head_dim) of its document's earlier
    tokens, detached float32 on the CPU, and one exact faiss inner-product index per head."""

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, capacity: int) -> None:
        self.n_heads, self.head_dim, self.capacity = n_heads, head_dim, capacity
        self.keys: list[Tensor | None] = [None] * batch_size
        self.values: list[Tensor | None] = [None] * batch_size
        self.indexes: list[list | None] = [None] * batch_size

    def size(self, row: int) -> int:
        """Tokens held for ``row``."""
        keys = self.keys[row]
        return 0 if keys is None else keys.shape[1]

    def add(self, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
        """Store the real tokens (``mask`` True, or all) of k, v (batch, heads, L, head_dim)."""
        k, v = k.detach().float().cpu(), v.detach().float().cpu()
        for row in range(k.shape[0]):
            keep = slice(None) if mask is None else mask[row].cpu()
            new_k, new_v = k[row][:, keep], v[row][:, keep]
            if new_k.shape[1] == 0:
                continue
            if self.keys[row] is not None:
                new_k, new_v = torch.cat([self.keys[row], new_k], 1), torch.cat([self.values[row], new_v], 1)
            self.keys[row], self.values[row] = new_k[:, -self.capacity :].contiguous(), new_v[:, -self.capacity :].contiguous()
            self._index(row)

    def _index(self, row: int) -> None:
        from plugformer_plugins.retrieval.faiss_support import require_faiss

        faiss = require_faiss()
        indexes = []
        for head in range(self.n_heads):
            index = faiss.IndexFlatIP(self.head_dim)
            index.add(self.keys[row][head].numpy())
            indexes.append(index)
        self.indexes[row] = indexes

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The top-``k`` keys by inner product for every query of q (batch, heads, Lq, d):
        keys and values (batch, heads, Lq, k, d) as constants on q's device, and a bool
        (batch, heads, Lq, k) that is False where a row holds fewer than k tokens."""
        batch, heads, length, dim = q.shape
        queries = q.detach().float().cpu()
        ids = torch.full((batch, heads, length, k), -1, dtype=torch.long)
        for row in range(batch):
            if self.indexes[row] is None:
                continue
            for head in range(heads):
                _, found = self.indexes[row][head].search(queries[row, head].contiguous().numpy(), k)
                ids[row, head] = torch.from_numpy(found)
        valid = ids >= 0
        keys = torch.zeros(batch, heads, length, k, dim)
        values = torch.zeros_like(keys)
        for row in range(batch):
            if self.keys[row] is None:
                continue
            safe = ids[row].clamp(min=0)  # (heads, Lq, k)
            gather = lambda t: t.gather(1, safe.reshape(heads, -1, 1).expand(-1, -1, dim)).view(heads, length, k, dim)
            keys[row], values[row] = gather(self.keys[row]), gather(self.values[row])
        to = dict(device=q.device, dtype=q.dtype)
        return keys.to(**to), values.to(**to), valid.to(q.device)

    def reorder(self, index: Tensor) -> None:
        from plugformer_plugins.retrieval.faiss_support import require_faiss

        rows = index.tolist()
        self.keys, self.values = [self.keys[i] for i in rows], [self.values[i] for i in rows]
        # A row may be repeated (beams): each gets its own copy of the indexes.
        clone = require_faiss().clone_index if any(self.indexes) else None
        self.indexes = [None if self.indexes[i] is None else [clone(ix) for ix in self.indexes[i]] for i in rows]

    def detach(self) -> None:
        """Nothing to cut: the memory only ever holds detached copies."""

    def reset(self, rows: Tensor) -> None:
        for row in rows.nonzero().flatten().tolist():
            self.keys[row] = self.values[row] = self.indexes[row] = None


class MemorizingAttention(Attention):
    """Local causal softmax attention (with every position term, through
    :meth:`Attention.explicit_attend`) mixed with top-k attention over a :class:`KnnMemory`
    by a learned per-head gate. Retrieved keys carry no position terms (as in the paper)."""

    def __init__(self, config: MemorizingAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        self.config = config
        self.gate = set_weight_decay(nn.Parameter(torch.full((ctx.n_heads,), float(config.gate_init))), False)

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        if streaming:
            return KnnMemory(batch_size, self.n_heads, self.head_dim, self.config.memory_size)
        return super().new_state(batch_size, streaming=streaming)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        q_positions: Tensor,
        k_positions: Tensor,
        state: AttentionState | None = None,
    ) -> Tensor:
        allowed = allowed_keys(q.shape[-2], k.shape[-2], causal=self.causal, key_padding_mask=key_padding_mask, device=q.device)
        local = self.explicit_attend(q, k, v, allowed, q_positions, k_positions)
        gate = torch.sigmoid(self.gate).view(1, -1, 1, 1).to(q.dtype)
        if not isinstance(state, KnnMemory):
            return local * (1 - gate)  # nothing retrieved: the retrieved term is zero
        # Retrieve before storing this segment: a query never sees its own or later tokens there.
        retrieved = self.retrieve(q, state)
        state.add(k, v, key_padding_mask)
        return local * (1 - gate) + retrieved * gate

    def retrieve(self, q: Tensor, memory: KnnMemory) -> Tensor:
        """Softmax attention of q over its top-k memory entries: (batch, heads, Lq, d); zero
        for a query whose row holds nothing yet."""
        keys, values, valid = memory.search(q, self.config.top_k)
        scores = torch.einsum("bhld,bhlkd->bhlk", q * self.scale, keys).float()
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1).to(q.dtype) * valid.to(q.dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        return torch.einsum("bhlk,bhlkd->bhld", weights, values)


COMPONENT = Component(
    kind="attention",
    name="memorizing",
    factory=MemorizingAttention,
    config=MemorizingAttentionConfig,
    summary="Local causal attention plus top-k faiss retrieval over a per-document memory of past keys/values, gated per head.",
    reference="Wu et al. 2022, Memorizing Transformers",
    capabilities=Capabilities(
        provides={"causal", "key_padding_mask", "score_bias", "qk_transform", "relative_terms"},
        cost="quadratic",
    ),
)
