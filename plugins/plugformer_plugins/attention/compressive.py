"""The Compressive Transformer (Rae et al. 2020, "Compressive Transformers for Long-Range
Sequence Modelling").

Transformer-XL's memory (:mod:`plugformer_plugins.attention.transformer_xl`) of ``mem_len``
hidden states per layer, plus a second, compressed memory of ``compressed_len`` slots. The
hidden states pushed out of the memory are not dropped: every ``rate`` consecutive ones
become one slot through the compression function f_c, mean pooling or a strided 1D
convolution (kernel = stride = rate; the paper's best), and the oldest slots fall off the
compressed memory. A segment attends causally over [compressed memory; memory; segment].

f_c is trained only by the attention-reconstruction loss: for the layer's current queries
(from the segment's hidden states h), the attention over the evicted memories and over their
compression should agree,

    L_attn = ‖attn(h, old_mem) − attn(h, f_c(old_mem))‖²  (mean over elements),

computed with a stop-gradient on h and on the attention's projections (content-based
attention, no position terms, as in the paper). It is reported as the loss term
``compression`` (``<stage>/loss_compression``), times ``reconstruction_weight``; the
language-model loss never reaches f_c (the compressed memory is stored detached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import AttentionState, BuildContext, Component, bounds, repeat_kv
from plugformer_plugins.attention.transformer_xl import CAPABILITIES, SegmentMemory, TransformerXLAttention, TransformerXLConfig


class Compression(str, Enum):
    conv = "conv"
    mean = "mean"


@dataclass
class CompressiveConfig:
    """``mem_len``: uncompressed memory per layer; ``compressed_len``: compressed slots per
    layer; ``rate``: c, hidden states per compressed slot; ``compression``: f_c, ``conv``
    (strided convolution, trained by the reconstruction loss) or ``mean`` (pooling, nothing
    to train); ``reconstruction_weight``: the weight of the ``compression`` loss term."""

    mem_len: int = field(default=64, metadata=bounds(ge=1))
    compressed_len: int = field(default=64, metadata=bounds(ge=1))
    rate: int = field(default=2, metadata=bounds(ge=1))
    compression: Compression = Compression.conv
    reconstruction_weight: float = field(default=1.0, metadata=bounds(ge=0.0))
    bias: bool = True


@dataclass
class CompressiveMemory(AttentionState):
    """A layer's two memories: the recent hidden states and the compressed slots."""

    memory: SegmentMemory
    compressed: SegmentMemory

    def reorder(self, index: Tensor) -> None:
        self.memory.reorder(index)
        self.compressed.reorder(index)

    def detach(self) -> None:
        self.memory.detach()
        self.compressed.detach()

    def reset(self, rows: Tensor) -> None:
        self.memory.reset(rows)
        self.compressed.reset(rows)


class Compressor(nn.Module):
    """f_c: (batch, n·c, d_model) → (batch, n, d_model), by a strided convolution (initialized
    to mean pooling, so compression starts from the baseline) or by mean pooling."""

    def __init__(self, d_model: int, rate: int, kind: Compression) -> None:
        super().__init__()
        self.rate, self.kind = rate, Compression(kind)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate) if self.kind is Compression.conv else None
        self.init_weights()

    def init_weights(self) -> None:
        if self.conv is not None:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight += torch.eye(self.conv.in_channels)[:, :, None] / self.rate
                self.conv.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        if self.conv is None:
            batch, length, width = hidden.shape
            return hidden.view(batch, length // self.rate, self.rate, width).mean(dim=2)
        return self.conv(hidden.transpose(1, 2).to(self.conv.weight.dtype)).transpose(1, 2)


class CompressiveAttention(TransformerXLAttention):
    """Causal attention over [compressed memory; memory; segment] with a
    :class:`CompressiveMemory` (from ``new_state(batch, streaming=True)``); full attention
    otherwise. :meth:`aux_losses` holds the last forward pass's ``compression`` term."""

    #: The compressor learns only from what a streaming state evicts (the conformance kit's
    #: stateless gradient check skips it; tests/test_compressive.py checks it with a state).
    state_only_parameters = ("compressor.*",)

    def __init__(self, config: CompressiveConfig, ctx: BuildContext) -> None:
        super().__init__(TransformerXLConfig(mem_len=config.mem_len, bias=config.bias), ctx)
        self.compressed_len = config.compressed_len
        self.rate = config.rate
        self.reconstruction_weight = config.reconstruction_weight
        self.compressor = Compressor(ctx.d_model, config.rate, config.compression)
        self._aux: dict[str, Tensor] = {}

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        if streaming and not self.cross:
            return CompressiveMemory(SegmentMemory(limit=self.mem_len), SegmentMemory(limit=self.compressed_len))
        return super().new_state(batch_size, streaming=streaming)

    def aux_losses(self) -> dict[str, Tensor]:
        return dict(self._aux)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None, state=None, **kwargs) -> Tensor:
        self._aux = {}
        if not isinstance(state, CompressiveMemory):
            return super().forward(x, mask=mask, positions=positions, state=state, **kwargs)
        parts = [m for m in (state.compressed, state.memory) if m.hidden is not None and m.length > 0]
        memory = torch.cat([m.hidden for m in parts], dim=1) if parts else None
        memory_mask = torch.cat([m.mask for m in parts], dim=1) if parts else None
        out = self.attend_with_memory(x, mask, positions, memory, memory_mask)
        evicted = state.memory.push(x, mask, multiple=self.rate)
        loss = None
        if evicted is not None:
            old, old_mask = evicted
            compressed = self.compressor(old)
            slot_mask = old_mask.view(old_mask.shape[0], -1, self.rate).all(dim=-1)
            loss = self.reconstruction_loss(x, old, old_mask, compressed, slot_mask)
            state.compressed.push(compressed, slot_mask)
        if self.training and self.compressor.conv is not None:
            # Ties every compressor parameter to the loss even when nothing was evicted, so
            # DDP finds no unused parameters in the first steps.
            tie = sum(p.sum() for p in self.compressor.parameters()) * 0.0
            loss = tie if loss is None else loss + tie
        if loss is not None:
            self._aux = {"compression": loss * self.reconstruction_weight}
        return out

    def reconstruction_loss(self, h: Tensor, old: Tensor, old_mask: Tensor, compressed: Tensor, compressed_mask: Tensor) -> Tensor:
        """Mean squared difference of content attention from queries of ``h`` over the evicted
        hidden states ``old`` and over their compression; only ``compressed`` keeps a gradient."""
        batch, length, _ = h.shape
        weight, bias = self.query.weight.detach(), None if self.query.bias is None else self.query.bias.detach()
        q = F.linear(h.detach(), weight, bias).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        kv_weight = self.key_value.weight.detach()
        kv_bias = None if self.key_value.bias is None else self.key_value.bias.detach()

        def attend(memory: Tensor, memory_mask: Tensor) -> Tensor:
            k, v = self._split_kv(F.linear(memory.to(h.dtype), kv_weight, kv_bias))
            k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            allowed = memory_mask[:, None, None, :]
            scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
            out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
            return out * allowed.any(dim=-1, keepdim=True).to(out.dtype)

        return F.mse_loss(attend(compressed, compressed_mask), attend(old.detach(), old_mask))


COMPONENT = Component(
    kind="attention",
    name="compressive",
    factory=CompressiveAttention,
    config=CompressiveConfig,
    summary="Compressive Transformer: XL memory plus a compressed memory (conv or mean pooling, rate c) with the attention-reconstruction loss.",
    reference="Rae et al. 2020, Compressive Transformers for Long-Range Sequence Modelling",
    capabilities=CAPABILITIES,
)
