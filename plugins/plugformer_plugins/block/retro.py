"""The RETRO layer (Borgeaud et al. 2022, "Improving language models by retrieving from
trillions of tokens"): self-attention, then chunked cross-attention (CCA) to the encoded
neighbours of the previous chunk, then the feed-forward layer, each a residual sublayer
placed like ``standard``'s (``placement`` pre, post or sandwich).

The neighbours arrive as the batch extras ``retro_neighbours`` (batch, chunks, k, r) token
ids (r = 2m: a neighbour chunk and its continuation) with ``retro_neighbours_mask`` (True
for real tokens), from the ``retro_text`` data task. Per chunk u of m tokens:

1. the neighbour encoder (bidirectional, ``encoder_layers`` layers: self-attention over one
   neighbour's r tokens, cross-attention to this layer's activations H_u of chunk u, and a
   feed-forward layer) turns each neighbour into r vectors: E_u, (k·r, d_model);
2. the tokens u·m + m − 1 … u·m + 2m − 2 (chunk u shifted by m − 1) attend to E_u.

Chunk u's neighbours were retrieved with chunk u's own tokens and E_u reads H_u, which
depends on tokens up to u·m + m − 1 only; every token that attends to E_u comes at or
after that position, so no token sees retrieval made from its own future (the first m − 1
tokens attend to nothing). Without neighbours in the extras (generation, a batch of plain
text) the CCA sublayer is skipped and the layer is a ``standard`` one.

Differences from the paper, for CPU-sized experiments: every ``retro`` layer has its own
neighbour encoder, conditioned on its own input (the paper encodes once, at the first CCA
layer, and shares the encoding), with its own token embedding and learned absolute positions
over the r neighbour tokens (the paper uses relative positions in the encoder and the CCA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import (
    BlockParts, BuildContext, Capabilities, Component, ConfigError, LayerState, StepInputs, bounds, mark_residual_projection,
)
from plugformer_plugins.block.standard import StandardBlock, StandardBlockConfig

NEIGHBOURS = "retro_neighbours"
NEIGHBOURS_MASK = "retro_neighbours_mask"
#: Chunk size when neither the config nor the data says (the conformance kit's sizes).
FALLBACK_CHUNK_SIZE = 4


@dataclass
class RetroBlockConfig(StandardBlockConfig):
    chunk_size: Optional[int] = field(default=None, metadata=bounds(ge=1))  # m; None: the data's (retro_chunk_size)
    encoder_layers: int = field(default=2, metadata=bounds(ge=1))  # layers of the neighbour encoder
    encoder_heads: Optional[int] = field(default=None, metadata=bounds(ge=1))  # None: model.n_heads
    neighbour_length: Optional[int] = field(default=None, metadata=bounds(ge=1))  # r; None: 2 · chunk_size


def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], dropout: float) -> Tensor:
    """Softmax attention (n, heads, Lq, d) over keys (n, heads, Lk, d); ``key_mask`` (n, Lk)
    True for real keys, or None when every key is real (then SDPA needs no mask at all). A
    query whose keys are all masked gets zeros."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # One mask row per example, broadcast over heads and queries (never n × Lq × Lk).
    allowed = key_mask[:, None, None, :]
    any_key = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~any_key, dropout_p=dropout)
    return out * any_key.to(out.dtype)


def _all_real(mask: Optional[Tensor]) -> Optional[Tensor]:
    """``mask`` unless it masks nothing (then None: attention takes its unmasked path)."""
    return None if mask is None or bool(mask.all()) else mask


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention: queries from ``x``, keys and values from ``memory``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(
                f"The retro block's attention has d_model={d_model}, not divisible by {n_heads} heads.",
                expected="model.d_model a multiple of the heads", fix="set model.plan.options.block.retro.encoder_heads",
            )
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = mark_residual_projection(nn.Linear(d_model, d_model))

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Optional[Tensor]) -> Tensor:
        """x (n, Lq, d), memory (n, Lk, d), memory_mask (n, Lk) True for real keys (None: all)."""
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        q = heads(self.q(x))
        k, v = (heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        out = _attend(q, k, v, memory_mask, self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-norm: bidirectional self-attention over a neighbour, cross-attention to the
    decoder's activations of the query chunk, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.self_attention = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attention = MultiHeadAttention(d_model, n_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), mark_residual_projection(nn.Linear(4 * d_model, d_model)))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor], chunk: Tensor, chunk_mask: Optional[Tensor]) -> Tensor:
        """x (n·k, r, d): the k neighbours of each of n chunks; mask (n·k, r) or None; chunk
        (n, m, d) and chunk_mask (n, m) or None: the chunk those neighbours were retrieved for."""
        h = self.norms[0](x)
        x = x + self.drop(self.self_attention(h, h, mask))
        # Every token of chunk i's k neighbours attends to the same keys (chunk i's m tokens):
        # one query sequence of k·r tokens per chunk, so the chunk's keys and values are
        # projected once, not once per neighbour.
        n = chunk.shape[0]
        queries = self.norms[1](x).reshape(n, -1, x.shape[-1])
        x = x + self.drop(self.cross_attention(queries, chunk, chunk_mask).view_as(x))
        return x + self.drop(self.ffn(self.norms[2](x)))


class NeighbourEncoder(nn.Module):
    """(…, k, r) neighbour tokens and the chunk's activations (…, m, d) → (…, k·r, d)."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, length: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(length, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: Tensor, mask: Optional[Tensor], chunk: Tensor, chunk_mask: Optional[Tensor]) -> Tensor:
        """tokens, mask (n, k, r); chunk (n, m, d); chunk_mask (n, m) → (n, k·r, d). A mask of
        None means every token is real."""
        n, k, r = tokens.shape
        x = self.embedding(tokens.flatten(0, 1)) + self.position.weight[:r].to(chunk.dtype)
        x = x.to(chunk.dtype)
        flat_mask = _all_real(mask.flatten(0, 1) if mask is not None else None)
        chunk_mask = _all_real(chunk_mask)
        for layer in self.layers:
            x = layer(x, flat_mask, chunk, chunk_mask)
        return self.norm(x).view(n, k * r, -1)


class ChunkedCrossAttention(nn.Module):
    """RETRO's CCA over a whole sequence: h (batch, L, d) and neighbours (batch, chunks ≥
    ⌈L/m⌉, k, r) → (batch, L, d), the first m − 1 positions zero."""

    def __init__(self, ctx: BuildContext, chunk_size: int, encoder: NeighbourEncoder, n_heads: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.encoder = encoder
        self.attention = MultiHeadAttention(ctx.d_model, n_heads, ctx.dropout)

    def forward(self, h: Tensor, mask: Tensor | None, neighbours: Tensor, neighbours_mask: Tensor | None) -> Tensor:
        batch, length, d = h.shape
        m = self.chunk_size
        n = -(-length // m)
        if neighbours.dim() != 4 or neighbours.shape[0] != batch or neighbours.shape[1] < n:
            raise ValueError(
                f"retro: extras[{NEIGHBOURS!r}] has shape {tuple(neighbours.shape)}; expected (batch={batch}, chunks>={n}, k, r) "
                f"for {length} tokens in chunks of {m}"
            )
        neighbours = neighbours[:, :n]
        neighbours_mask = _all_real(neighbours_mask[:, :n] if neighbours_mask is not None else None)
        pad = n * m - length
        chunks = F.pad(h, (0, 0, 0, pad)).view(batch * n, m, d)  # H_u
        if mask is None and not pad:
            chunk_mask = None
        else:
            real = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=h.device)
            chunk_mask = F.pad(real, (0, pad), value=False).view(batch * n, m)
        flat_mask = neighbours_mask.flatten(0, 1) if neighbours_mask is not None else None
        encoded = self.encoder(neighbours.flatten(0, 1), flat_mask, chunks, chunk_mask)  # (B·n, k·r, d)
        memory_mask = flat_mask.reshape(batch * n, -1) if flat_mask is not None else None
        # Queries: positions m−1 … L−1, chunk u of them attends to E_u.
        shifted = h[:, m - 1 :]
        shifted_length = shifted.shape[1]
        queries = F.pad(shifted, (0, 0, 0, n * m - shifted_length)).view(batch * n, m, d)
        out = self.attention(queries, encoded, memory_mask).view(batch, n * m, d)[:, :shifted_length]
        return F.pad(out, (0, 0, m - 1, 0))


class RetroBlock(StandardBlock):
    """A ``standard`` block with a chunked cross-attention sublayer between self-attention
    and feed-forward (see the module docstring)."""

    def __init__(self, config: RetroBlockConfig, ctx: BuildContext, parts: BlockParts) -> None:
        super().__init__(config, ctx, parts)
        data_chunk = ctx.task.get("retro_chunk_size")
        if config.chunk_size is not None and data_chunk is not None and config.chunk_size != data_chunk:
            raise ConfigError(
                f"The retro block's chunk_size={config.chunk_size} differs from the data's chunk size {data_chunk}.",
                expected="the chunks the neighbours were retrieved for",
                fix="leave the block's chunk_size unset (it follows data.chunk_size)",
            )
        self.chunk_size = int(config.chunk_size or data_chunk or FALLBACK_CHUNK_SIZE)
        length = config.neighbour_length or 2 * self.chunk_size
        heads = config.encoder_heads or ctx.n_heads
        encoder = NeighbourEncoder(ctx.vocab_size, ctx.d_model, heads, config.encoder_layers, length, ctx.dropout)
        self.cca = ChunkedCrossAttention(ctx, self.chunk_size, encoder, heads)
        self.norms["retro"] = parts.make_norm()
        if hasattr(self, "out_norms"):
            self.out_norms["retro"] = parts.make_norm()
        self.neighbour_length = length
        self.vocab_size = ctx.vocab_size

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        x = self._residual("attention", x, lambda h: self.self_attend(h, inputs, state))
        neighbours = inputs.extras.get(NEIGHBOURS)
        if neighbours is not None:
            if state is not None:
                raise NotImplementedError(
                    "retro: chunked cross-attention with neighbours runs on whole sequences; decoding token by token "
                    "with a state does not keep the chunk activations it needs (generate without neighbours)"
                )
            mask = inputs.extras.get(NEIGHBOURS_MASK)
            x = self._residual("retro", x, lambda h: self.cca(h, inputs.mask, neighbours, mask))
        return self._residual("ffn", x, self.ffn)

    def kit_extras(self, batch: int, length: int) -> dict[str, Tensor]:
        """Neighbours for the conformance kit (docs/testing.md): random tokens, the last
        neighbour's tail masked, for ⌈length/m⌉ chunks of ``batch`` rows."""
        generator = torch.Generator().manual_seed(7)
        n = -(-length // self.chunk_size)
        tokens = torch.randint(1, self.vocab_size, (batch, n, 2, self.neighbour_length), generator=generator)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, :, -1, self.neighbour_length // 2 :] = False
        return {NEIGHBOURS: tokens, NEIGHBOURS_MASK: mask}


COMPONENT = Component(
    kind="block",
    name="retro",
    factory=RetroBlock,
    config=RetroBlockConfig,
    summary="RETRO layer: self-attention, chunked cross-attention to encoded retrieved neighbours (causal by chunk), FFN.",
    reference="Borgeaud et al. 2022, Improving language models by retrieving from trillions of tokens",
    capabilities=Capabilities(requires={"data": {"retro_neighbours"}}),
)
